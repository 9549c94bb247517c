-- The outbox contract of cdc-relay (DESIGN.md §4). `cdc-relay init` applies the
-- same statements for the table named by --table; apply this file yourself
-- (e.g. from your migrations) and run `cdc-relay init --no-table` if you prefer.
CREATE TABLE IF NOT EXISTS public.outbox (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb NOT NULL DEFAULT '{}',
    exchange       text NULL,
    routing_key    text NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Rows that can never be published (unroutable, too large, not mappable) land
-- here with the reason; `cdc-relay dead-letters list|replay` reads them.
CREATE TABLE IF NOT EXISTS public.outbox_dead_letter (
    id          bigserial PRIMARY KEY,
    outbox_id   uuid NOT NULL,
    reason      text NOT NULL,
    row_data    jsonb NOT NULL,
    lsn         pg_lsn NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    replayed_at timestamptz NULL
);
