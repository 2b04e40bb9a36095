-- A thread's runs by position. A submission numbers its run after the thread's last
-- (`INSERT_QUEUED_RUN`: `MAX(thread_position) ... WHERE thread_id = ?`), and the only index
-- with `thread_id` first was the partial one of unfinished runs, which that statement
-- cannot use: every submission scanned the whole `runs` table on the writer, so its cost
-- grew with every run ever stored (about 0.3 ms at 4,000 runs). PostgreSQL has had
-- `runs_thread` since its first migration.
CREATE INDEX runs_thread ON runs(thread_id, thread_position);
