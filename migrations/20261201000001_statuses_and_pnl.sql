-- The job states the order life cycle and the risk limits add (see `src/job.rs`), and the columns
-- of a closing fill: realized PnL and fees (in the account currency) and why the position was exited.

ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check CHECK (status IN ('queued', 'executing', 'succeeded',
    'succeeded_unprotected', 'skipped', 'rejected', 'dead', 'working', 'expired', 'blocked'));

ALTER TABLE trades ADD COLUMN pnl numeric;
ALTER TABLE trades ADD COLUMN fee numeric;
-- 'signal' (an alert closed it), 'stop_loss', 'take_profit', 'trailing_stop', 'liquidation', 'manual'
ALTER TABLE trades ADD COLUMN exit_reason text;
