-- A message's insert touches its thread's updated_at in the same statement, so that
-- appending a message is one statement instead of a transaction of two (the store's
-- `insert_message`; `Backend::touches_thread_on_insert`). PostgreSQL keeps its explicit
-- UPDATE: there it also takes the thread's row lock that orders concurrent appends, which
-- SQLite's single writer does by itself.
CREATE TRIGGER messages_touch_thread AFTER INSERT ON messages
BEGIN
    UPDATE threads SET updated_at = NEW.created_at WHERE id = NEW.thread_id;
END;
