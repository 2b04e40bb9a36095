-- Sessions (issue 22): a login starts a session, the family of refresh tokens rotated from
-- it. Access tokens and WebSocket tickets name their session; ending the session (logout,
-- logout-all, revoking it from the sessions list, or a spent refresh token presented again)
-- ends every token, ticket and open stream of it. A session also has an absolute lifetime
-- that rotation never extends.
--
-- Tokens issued before this migration name no session and stop working: their holders log
-- in once more. Refresh tokens and tickets are recreated for that reason (and because their
-- new columns are NOT NULL); per-token revocation is replaced by session state.

DROP TABLE revoked_access_tokens;
DROP TABLE refresh_tokens;
DROP TABLE ws_tickets;

CREATE TABLE sessions (
    id           TEXT COLLATE "C" PRIMARY KEY,
    user_id      TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at   BIGINT NOT NULL,
    -- The absolute end: no rotation reaches past it.
    expires_at   BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    ended_at     BIGINT,
    -- logout, logout_all, revoked, refresh_reuse
    ended_reason TEXT,
    -- What the client said it was at login (shown in the sessions list), if anything.
    user_agent   TEXT
);
CREATE INDEX sessions_user ON sessions(user_id, created_at);

-- One row per issued refresh token; rotation sets revoked_at. A revoked token is kept until
-- it expires, so presenting it again is recognised as reuse.
CREATE TABLE refresh_tokens (
    jti        TEXT COLLATE "C" PRIMARY KEY,
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX refresh_tokens_session ON refresh_tokens(session_id);
CREATE INDEX refresh_tokens_expires ON refresh_tokens(expires_at);

-- WebSocket tickets, stored as SHA-256 digests. A socket opened with one ends when the access
-- token that bought the ticket would have expired (access_expires_at) or its session ends.
CREATE TABLE ws_tickets (
    id                TEXT COLLATE "C" PRIMARY KEY,
    user_id           TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_id        TEXT COLLATE "C" NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    expires_at        BIGINT NOT NULL,
    access_expires_at BIGINT NOT NULL,
    max_uses          INTEGER NOT NULL,
    uses              INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX ws_tickets_expires ON ws_tickets(expires_at);
CREATE INDEX ws_tickets_session ON ws_tickets(session_id);
