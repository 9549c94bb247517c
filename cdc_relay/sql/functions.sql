-- Application helpers `cdc-relay init` creates next to the outbox table (named
-- <table>_enqueue and <table>_emit: outbox_enqueue and outbox_emit for the
-- default table). outbox_enqueue inserts an outbox row in the caller's transaction (it is
-- published once that transaction commits); outbox_emit writes the same row as
-- a transactional logical decoding message instead (its prefix is init's
-- --message-prefix, 'cdc_relay' by default: run the relay with the same one), which
-- needs no table, no cleanup and no vacuum. Both return the message id.
-- payload and headers travel as the text of their jsonb values, so a message's
-- body is byte for byte what a table row with the same payload gives.
CREATE OR REPLACE FUNCTION {enqueue}(
    aggregate_type text,
    aggregate_id text,
    event_type text,
    payload jsonb,
    headers jsonb DEFAULT '{{}}',
    exchange text DEFAULT NULL,
    routing_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE sql VOLATILE
AS $fn$
    INSERT INTO {outbox}
        (aggregate_type, aggregate_id, event_type, payload, headers, exchange, routing_key)
    VALUES ($1, $2, $3, $4, coalesce($5, '{{}}'), $6, $7)
    RETURNING id
$fn$;

CREATE OR REPLACE FUNCTION {emit}(
    aggregate_type text,
    aggregate_id text,
    event_type text,
    payload jsonb,
    headers jsonb DEFAULT '{{}}',
    exchange text DEFAULT NULL,
    routing_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $fn$
DECLARE
    new_id uuid := gen_random_uuid();
BEGIN
    PERFORM pg_logical_emit_message(true, {prefix}, jsonb_build_object(
        'id', new_id,
        'aggregate_type', $1,
        'aggregate_id', $2,
        'event_type', $3,
        'payload', $4::text,
        'headers', coalesce($5, '{{}}')::text,
        'exchange', $6,
        'routing_key', $7,
        'created_at', now()
    )::text);
    RETURN new_id;
END
$fn$;
