-- Spending caps (see the server's `budgets` module). A budget belongs to the user who set
-- it and caps that user's LLM calls: all of them (`scope` user), those made with one API
-- key (key, `scope_id` the key's id) or those of one model (model, `scope_id` the name).
-- It limits USD (`limit_micro_usd`) or tokens (`limit_tokens`) per day, week or month,
-- or over the last `days` days (`rolling_days`), in the IANA time zone `timezone`.
CREATE TABLE budgets (
    id              TEXT PRIMARY KEY,
    user_id         TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    scope           TEXT NOT NULL,
    scope_id        TEXT,
    limit_micro_usd BIGINT,
    limit_tokens    BIGINT,
    period          TEXT NOT NULL,
    days            BIGINT,
    timezone        TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);
CREATE INDEX budgets_user ON budgets(user_id, created_at);
-- What a budget's calls used, per quarter of an hour (`bucket`, its start in unix ms; every
-- time zone's midnight is on a quarter hour), in the budget's unit (micro-dollars or tokens).
CREATE TABLE budget_usage (
    budget_id TEXT NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    bucket    BIGINT NOT NULL,
    used      BIGINT NOT NULL,
    PRIMARY KEY (budget_id, bucket)
);
-- What calls in progress may still use: reserved before a call at its most, removed when
-- it is settled to what it used. A reservation a crash left behind stops counting at
-- `expires_at`.
CREATE TABLE budget_reservations (
    id         TEXT PRIMARY KEY,
    budget_id  TEXT NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    bucket     BIGINT NOT NULL,
    amount     BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX budget_reservations_budget ON budget_reservations(budget_id, bucket);
-- The warnings sent: one per budget, period and threshold (50, 80, 100 percent).
CREATE TABLE budget_notices (
    budget_id    TEXT NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    period_start BIGINT NOT NULL,
    threshold    BIGINT NOT NULL,
    PRIMARY KEY (budget_id, period_start, threshold)
);
