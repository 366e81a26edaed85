-- Issue 17: one index fewer to write for every job.
--
-- `jobs_user (user_id, accepted_at)` is read by no query any more: a user's jobs are listed in
-- `job_id` order (`jobs_user_job`; job ids are UUIDv7, minted by the ingress when it accepts the
-- alert, so that order is the order of `accepted_at`), the failed jobs through `jobs_failed`, and
-- the risk breaker through `jobs_user_started`. Each job row paid an entry in it.
DROP INDEX IF EXISTS jobs_user;
