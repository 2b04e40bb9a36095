-- Alerts, scheduled reports and webhooks (see the server's `alerts` module).
--
-- An alert rule belongs to the user who made it and watches their usage (or, for a
-- team's owner or admin, the team's: `team_id`). It is evaluated at each tick of its
-- schedule; `next_tick_at` is the next one. Exactly one instance takes a tick: the one
-- whose UPDATE moves `next_tick_at` from the value it read (compare-and-set), and the next
-- tick is the first after the time it is taken, so ticks missed while every instance was
-- down run once, not once each.
CREATE TABLE alert_rules (
    id           TEXT COLLATE "C" PRIMARY KEY,
    user_id      TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    team_id      TEXT COLLATE "C",
    kind         TEXT NOT NULL,
    params       TEXT NOT NULL,
    every        TEXT NOT NULL,
    at_hour      BIGINT NOT NULL,
    timezone     TEXT NOT NULL,
    next_tick_at BIGINT NOT NULL,
    last_tick_at BIGINT,
    ticks        BIGINT NOT NULL DEFAULT 0,
    created_at   BIGINT NOT NULL
);
CREATE INDEX alert_rules_user ON alert_rules(user_id, created_at);
CREATE INDEX alert_rules_due ON alert_rules(next_tick_at);
-- What a rule raised: at most one per rule and period (`period_key`), whatever the
-- number of instances or ticks. `run_id`: the run that explains it (or the report).
CREATE TABLE alerts (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    rule_id    TEXT COLLATE "C" NOT NULL REFERENCES alert_rules(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    period_key TEXT NOT NULL,
    title      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    value      DOUBLE PRECISION,
    threshold  DOUBLE PRECISION,
    run_id     TEXT COLLATE "C",
    thread_id  TEXT COLLATE "C",
    created_at BIGINT NOT NULL,
    UNIQUE (rule_id, period_key)
);
CREATE INDEX alerts_user ON alerts(user_id, created_at);
-- Where a user's alerts are posted (Standard Webhooks). The signing secret is kept to
-- sign with; it is shown once, when the webhook is made.
CREATE TABLE webhooks (
    id          TEXT COLLATE "C" PRIMARY KEY,
    user_id     TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX webhooks_user ON webhooks(user_id, created_at);
-- One message to one webhook: its id is the `webhook-id` of every attempt, so a receiver
-- that saw it once can drop the rest. `next_attempt_at` is when it is due (or, while an
-- instance is sending it, when that instance's lease ends).
CREATE TABLE webhook_deliveries (
    id              TEXT COLLATE "C" PRIMARY KEY,
    webhook_id      TEXT COLLATE "C" NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    user_id         TEXT COLLATE "C" NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    -- Attempts so far, redeliveries included; the retry schedule counts from
    -- `schedule_start` (the attempts made before the last redelivery).
    attempts        BIGINT NOT NULL DEFAULT 0,
    schedule_start  BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries(status, next_attempt_at);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries(webhook_id, created_at);
-- The delivery log: every attempt, with the receiver's status code or the error.
CREATE TABLE webhook_attempts (
    delivery_id TEXT COLLATE "C" NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt     BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    status_code BIGINT,
    error       TEXT,
    duration_ms BIGINT NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
