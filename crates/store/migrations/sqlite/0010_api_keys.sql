-- API keys for programs (see the server's `auth::api_keys`). A key is shown once, when it
-- is made; only its SHA-256 digest is kept (`secret_hash`), with its first characters
-- (`prefix`) so a person can tell their keys apart. `scopes` is a space-separated list of
-- what the key may do. A key acts as the user who made it, on nothing else: every row
-- written with it is that user's. Revoked or expired keys stop working at once (every
-- request looks the key up; long-lived streams are watched like sessions).
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    user_id      TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    secret_hash  TEXT NOT NULL UNIQUE,
    scopes       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    revoked_at   BIGINT
);
CREATE INDEX api_keys_user ON api_keys(user_id, created_at);
