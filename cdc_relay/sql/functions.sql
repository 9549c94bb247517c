-- The application helper `cdc-relay init` creates next to the outbox table
-- (<table>_enqueue: outbox_enqueue for the default table). It inserts an outbox
-- row in the caller's transaction (published once that transaction commits) and
-- returns the message id; callers need INSERT on the table, like any insert.
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
