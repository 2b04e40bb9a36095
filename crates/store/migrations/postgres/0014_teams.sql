-- Teams (see the server's `teams` module): a user makes a team and is its owner; others
-- join with a single-use invite. Roles: owner, admin, member. Admins see the team's usage
-- as aggregates per member, never anyone's messages. A budget with scope `team` (scope_id
-- the team's id) holds every member's calls.
CREATE TABLE teams (
    id         TEXT COLLATE "C" PRIMARY KEY,
    name       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE team_members (
    team_id   TEXT COLLATE "C" NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    user_id   TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    role      TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user ON team_members(user_id);
-- An invite is shown once; only its SHA-256 digest is kept.
CREATE TABLE team_invites (
    token_hash TEXT COLLATE "C" PRIMARY KEY,
    team_id    TEXT COLLATE "C" NOT NULL REFERENCES teams(id) ON DELETE CASCADE,
    role       TEXT NOT NULL,
    created_by TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_by    TEXT COLLATE "C",
    used_at    BIGINT
);
