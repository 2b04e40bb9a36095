-- Per-user rollups of workload_events (see the store's `rollups` module): what a run's
-- analysis reads instead of rescanning the rows. The store changes them in the same
-- transaction as the rows they fold, so they always agree.

-- Sums per (UTC day, provider, model, workload, source); `short_*` over the requests
-- short enough to route to a cheaper model. The sketches are text the store writes and
-- reads (`rollups::Group::latency_text`, `completion_text`): single requests per latency
-- bucket, and per bucket of completion tokens per request the single requests, all
-- requests and their tokens.
CREATE TABLE usage_rollups (
    user_id                 TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    day                     BIGINT NOT NULL,
    provider                TEXT NOT NULL,
    model                   TEXT NOT NULL,
    workload                TEXT NOT NULL,
    source                  TEXT NOT NULL,
    row_count               BIGINT NOT NULL,
    requests                BIGINT NOT NULL,
    errors                  BIGINT NOT NULL,
    timed_requests          BIGINT NOT NULL,
    prompt_tokens           BIGINT NOT NULL,
    completion_tokens       BIGINT NOT NULL,
    cached_tokens           BIGINT NOT NULL,
    reasoning_tokens        BIGINT NOT NULL,
    cost_usd                DOUBLE PRECISION NOT NULL,
    last_ts                 BIGINT NOT NULL,
    short_requests          BIGINT NOT NULL,
    short_prompt_tokens     BIGINT NOT NULL,
    short_completion_tokens BIGINT NOT NULL,
    short_cost_usd          DOUBLE PRECISION NOT NULL,
    latency_sketch          TEXT NOT NULL,
    completion_sketch       TEXT NOT NULL,
    PRIMARY KEY (user_id, day, provider, model, workload, source)
);

-- A row here means the rows stored before this migration are not folded yet: the first
-- instance to open the store takes it (deleting it) and folds them in the same transaction.
CREATE TABLE usage_rollup_backfill (id BIGINT PRIMARY KEY);
INSERT INTO usage_rollup_backfill (id) VALUES (1);
