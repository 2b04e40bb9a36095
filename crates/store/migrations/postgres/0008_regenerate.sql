-- Regenerating an answer keeps the earlier one in the thread, marked with the run that
-- answers its question again (`Runs::regenerate_run`). The mark is cleared if that run
-- ends without an answer (`Runs::restore_superseded`), found through the partial index.
ALTER TABLE messages ADD COLUMN superseded_by TEXT COLLATE "C";
CREATE INDEX messages_superseded_by ON messages(superseded_by) WHERE superseded_by IS NOT NULL;
