-- Issue 17: a job's commit updates its row without touching any index (a HOT update).
--
-- An UPDATE is HOT (the new row version stays on its page and no index gets a new entry) only
-- when no indexed column changes. The commit changes `status` and `finished_at`, and both were
-- indexed (the failed-jobs index on `status`, the risk breaker's on `finished_at`), so every
-- commit added an entry to each of the table's five indexes again. Now:
-- - failed jobs are found through `failed`, a stored column computed from `status`: it changes
--   only when a job fails (or a failed job is queued for a replay), not when it succeeds;
-- - the risk breaker reads a user's last finished jobs in the order they started (`started_at`,
--   set when a delivery begins; a user's jobs start one at a time, in their alerts' order), not in
--   the order they finished: a working entry that fills later, or a job an operator ends, no
--   longer counts as the latest; a reset (`breaker_reset_at`) counts the jobs started after it;
-- - pages keep 30% free, so the new version of a row fits next to the old one (set first, so the
--   rewrite that adding the stored column does already leaves the room).
-- Adding the column rewrites `jobs` under an exclusive lock: workers wait for it during the deploy.
ALTER TABLE jobs SET (fillfactor = 70);
ALTER TABLE jobs
    ADD COLUMN failed boolean GENERATED ALWAYS AS (status IN ('rejected', 'dead')) STORED;
DROP INDEX jobs_failed;
CREATE INDEX jobs_failed ON jobs (accepted_at) WHERE failed;
DROP INDEX jobs_user_finished;
CREATE INDEX jobs_user_started ON jobs (user_id, started_at);
