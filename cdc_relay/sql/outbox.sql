-- The outbox table of cdc-relay (docs/architecture.md), for the table named by --table.
-- Every column is required by the relay (a renamed one is refused at startup).
CREATE TABLE IF NOT EXISTS {outbox} (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{{}}',
    exchange       text NULL,
    routing_key    text NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
