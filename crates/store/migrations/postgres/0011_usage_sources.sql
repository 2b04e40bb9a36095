-- Usage from where it happens (OpenTelemetry spans, provider exports, the gateway), so a
-- row says more than prompt and completion tokens:
--   requests           how many requests the row stands for: 1 for one call, more for a
--                      provider export's bucket (a day of one model); a bucket's
--                      latency_ms is 0 and it is left out of latency percentiles;
--   cached_tokens      of prompt_tokens, those read from the provider's prompt cache;
--   cache_write_tokens of prompt_tokens, those written to the cache (Anthropic bills them);
--   reasoning_tokens   of completion_tokens, those the model spent reasoning;
--   source             where the row came from (upload, demo, apex, otlp, gateway,
--                      openai-usage, anthropic-usage, litellm-spend);
--   source_ref         the source's own id for the row (a span's trace and span id, a
--                      bucket's start, model and project): the same row sent twice is
--                      stored once, per user and source.
-- Rows stored before this migration stand for one request with no cache or reasoning
-- tokens, from an upload.
ALTER TABLE workload_events ADD COLUMN requests BIGINT NOT NULL DEFAULT 1;
ALTER TABLE workload_events ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workload_events ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workload_events ADD COLUMN reasoning_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE workload_events ADD COLUMN source TEXT NOT NULL DEFAULT 'upload';
ALTER TABLE workload_events ADD COLUMN source_ref TEXT;
CREATE UNIQUE INDEX workload_events_source_ref ON workload_events(user_id, source, source_ref)
    WHERE source_ref IS NOT NULL;
