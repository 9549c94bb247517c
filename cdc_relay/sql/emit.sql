-- Emitted messages (`cdc-relay init --grant-emit-to ROLE`, or a table-less outbox):
-- <table>_emit (outbox_emit for the default table) writes an outbox row as a
-- transactional logical decoding message instead of a table row (its prefix is
-- init's --message-prefix, 'cdc_relay' by default: run the relay with the same
-- one), which needs no table, no cleanup and no vacuum; it returns the message id.
-- payload and headers travel as the text of their jsonb values, so a message's
-- body is byte for byte what a table row with the same payload gives.
-- Any role may call pg_logical_emit_message, so the function signs each message
-- with HMAC-SHA256 under a random key that only its owner and the relay's role
-- (init --grant-to) can read, and the relay dead-letters every message whose
-- signature does not verify. EXECUTE is granted only to the roles named.
CREATE TABLE IF NOT EXISTS {keys} (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    key bytea NOT NULL CHECK (length(key) = 64)
);
REVOKE ALL ON {keys} FROM PUBLIC;
-- 64 bytes holding 488 random bits from the server's strong random source (gen_random_uuid).
INSERT INTO {keys} (key)
SELECT decode(replace(
    gen_random_uuid()::text || gen_random_uuid()::text
    || gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex')
ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION {emit}(
    aggregate_type text,
    aggregate_id text,
    event_type text,
    payload jsonb,
    headers jsonb DEFAULT '{{}}',
    exchange text DEFAULT NULL,
    routing_key text DEFAULT NULL
) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    new_id uuid := gen_random_uuid();
    body bytea;
    k bytea;
    inner_key bytea;
    outer_key bytea;
BEGIN
    body := convert_to(jsonb_build_object(
        'id', new_id,
        'aggregate_type', $1,
        'aggregate_id', $2,
        'event_type', $3,
        'payload', $4::text,
        'headers', coalesce($5, '{{}}')::text,
        'exchange', $6,
        'routing_key', $7,
        'created_at', now()
    )::text, 'UTF8');
    SELECT t.key INTO STRICT k FROM {keys} t;
    inner_key := k;
    outer_key := k;
    FOR i IN 0..63 LOOP
        inner_key := set_byte(inner_key, i, get_byte(k, i) # 54);
        outer_key := set_byte(outer_key, i, get_byte(k, i) # 92);
    END LOOP;
    -- content: the hex HMAC-SHA256 of the JSON text, then the JSON text
    PERFORM pg_logical_emit_message(true, {prefix}, encode(
        sha256(outer_key || sha256(inner_key || body)), 'hex') || convert_from(body, 'UTF8'));
    RETURN new_id;
END
$fn$;
REVOKE EXECUTE ON FUNCTION {emit}(text, text, text, jsonb, jsonb, text, text) FROM PUBLIC;
