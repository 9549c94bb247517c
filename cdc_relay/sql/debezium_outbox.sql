-- The outbox table of Debezium's Outbox Event Router (`cdc-relay init --layout debezium`),
-- for the table named by --table: the columns Debezium's users already insert into.
-- timestamp and tracingspancontext are optional for the relay.
CREATE TABLE IF NOT EXISTS {outbox} (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregatetype      varchar(255) NOT NULL,
    aggregateid        varchar(255) NOT NULL,
    type               varchar(255) NOT NULL,
    payload            jsonb NOT NULL,
    timestamp          timestamptz NOT NULL DEFAULT now(),
    tracingspancontext varchar(256) NULL
);
