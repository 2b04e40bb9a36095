-- The price book (see the server's `usage::price_book`): every cost Apex computes names
-- the price it was computed with, so a later price never rewrites history and
-- `GET /api/usage/explain` can show the arithmetic.
--   workload_events.price_version  the price entry a row was costed with: a built-in
--                                  entry (`builtin:...`) or one of the user's overrides
--                                  (`override:<id>`); NULL when the source sent the cost.
-- price_overrides: a user's negotiated rates, imported from a file. Append-only: an entry
-- is never changed or deleted while rows may name it; a newer entry supersedes it from its
-- effective date on. Rates are integers, in pico-dollars (1e-12 USD) per token ($1 per
-- million tokens is 1,000,000) and per request, so costs add up exactly.
ALTER TABLE workload_events ADD COLUMN price_version TEXT;
CREATE TABLE price_overrides (
    id                TEXT PRIMARY KEY,
    user_id           TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    provider          TEXT NOT NULL,
    model             TEXT NOT NULL,
    effective_from    BIGINT NOT NULL,
    input_rate        BIGINT NOT NULL,
    cached_input_rate BIGINT NOT NULL,
    cache_write_rate  BIGINT NOT NULL,
    output_rate       BIGINT NOT NULL,
    reasoning_rate    BIGINT NOT NULL,
    request_fee       BIGINT NOT NULL,
    note              TEXT,
    created_at        BIGINT NOT NULL
);
CREATE INDEX price_overrides_user ON price_overrides(user_id, created_at);
