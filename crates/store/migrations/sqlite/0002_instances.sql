-- Several instances on one database (see src/cluster.rs): each instance records that it is
-- alive, and every run records the instance executing it, so that a surviving instance can
-- end the runs of a dead one as `interrupted`. NULL: a run from before this migration, or
-- of an instance without a bus (single-instance mode, recovered at start).
CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
);
ALTER TABLE runs ADD COLUMN instance_id TEXT;
CREATE INDEX runs_user_status ON runs(user_id, status);
