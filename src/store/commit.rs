//! A job's commit as **one statement** (issue 17).
//!
//! A job's final state, its trade rows, the broker orders it left resting or cancelled, its
//! position change and its notification used to be a transaction of 4-8 statements (`BEGIN`,
//! the fenced `UPDATE jobs`, one statement per trade / order / position, the outbox, `COMMIT`),
//! each a round trip the lane waited for. They are now the parts of one data-modifying `WITH`,
//! sent once and committed on its own:
//!
//! ```text
//! WITH upd AS (UPDATE jobs SET status = .. WHERE job_id = .. AND status = 'executing' AND attempts = ..
//!              RETURNING job_id),                                        -- the attempt fence
//!      t AS (INSERT INTO trades (..) SELECT .. FROM (VALUES (0, ..), (1, ..)) v (n, ..)
//!            WHERE EXISTS (SELECT 1 FROM upd) ORDER BY n ON CONFLICT (job_id, leg) DO NOTHING),
//!      bc AS (UPDATE broker_orders SET state = 'cancelled' .. AND EXISTS (SELECT 1 FROM upd)),
//!      r0 AS (INSERT INTO broker_orders (..) SELECT .. FROM upd ON CONFLICT .. DO UPDATE ..),
//!      pos AS (INSERT INTO positions (..) SELECT .. FROM upd ON CONFLICT .. DO UPDATE ..),
//!      ch AS (SELECT channel_id FROM notification_channels WHERE .. AND EXISTS (SELECT 1 FROM upd)),
//!      ev AS (INSERT INTO notification_outbox .. WHERE EXISTS (SELECT 1 FROM ch) RETURNING ..),
//!      d AS (INSERT INTO notification_deliveries .. FROM ev, ch)
//! SELECT count(*) FROM upd
//! ```
//!
//! - **The fence holds.** Every part reads `upd` (`FROM upd`, or `EXISTS (SELECT 1 FROM upd)`): a
//!   delivery that was overtaken matches no job row, so nothing at all is written, and the count of
//!   0 tells the caller it was superseded ([`crate::store::StoreError::Superseded`]).
//! - **Atomic.** One statement is one transaction: all of it commits, or none of it.
//! - **Only the parts the outcome needs** are in the statement (a skipped job has no trade part; a
//!   close deletes the position instead of upserting it), so a statement's text is one of a few
//!   shapes, each prepared once per connection, and every part has scalar parameters: Postgres
//!   keeps one generic plan per shape instead of planning each execution again (the array
//!   version of this tried in an earlier session lost its gain to planning).
//! - **Each row is written once per statement.** All parts of a `WITH` run on one snapshot and a
//!   row must not be modified twice in one statement, so the parts are normalised first: a leg
//!   recorded twice keeps its first fill (as `ON CONFLICT DO NOTHING` did in sequence), an order
//!   both cancelled and left resting is only the resting upsert (what the sequence left), and an
//!   order left resting twice keeps its last state.
//!
//! [`record_fills`] (a caller's transaction: reconciliation, the benchmark's essential write) uses
//! the same parts with no fence.

use std::collections::HashSet;

use sqlx::{Postgres, QueryBuilder};
use uuid::Uuid;

use super::{pg_text, StoreError};
use crate::domain::Job;
use crate::exchanges::{Leg, RestingOrder};
use crate::executor::{Fill, Outcome, PositionChange};

/// What each part of a statement depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Nothing: the parts always run (inside a caller's transaction).
    Always,
    /// The fenced job update `upd` having matched its row.
    Fenced,
}

impl Gate {
    /// Appended to an `INSERT .. SELECT <values>`.
    pub(crate) fn from(self) -> &'static str {
        match self {
            Gate::Always => "",
            Gate::Fenced => " FROM upd",
        }
    }

    /// Appended to an `UPDATE` / `DELETE`'s `WHERE`.
    pub(crate) fn and(self) -> &'static str {
        match self {
            Gate::Always => "",
            Gate::Fenced => " AND EXISTS (SELECT 1 FROM upd)",
        }
    }
}

/// A `WITH` statement being built: `name AS (..)` parts, then the final `SELECT`.
pub(crate) struct Statement<'q> {
    qb: QueryBuilder<'q, Postgres>,
    parts: usize,
    pub(crate) gate: Gate,
}

impl<'q> Statement<'q> {
    pub(crate) fn new(gate: Gate) -> Self {
        Statement {
            qb: QueryBuilder::new("WITH "),
            parts: 0,
            gate,
        }
    }

    /// Start the part `name`; push its SQL into the returned builder, then [`Statement::close`].
    pub(crate) fn part(&mut self, name: &str) -> &mut QueryBuilder<'q, Postgres> {
        if self.parts > 0 {
            self.qb.push(",\n     ");
        }
        self.parts += 1;
        self.qb.push(name).push(" AS (");
        &mut self.qb
    }

    pub(crate) fn close(&mut self) {
        self.qb.push(")");
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.parts == 0
    }

    /// End with `select` (the statement's result) and hand out the builder to run it.
    pub(crate) fn finish(mut self, select: &str) -> QueryBuilder<'q, Postgres> {
        self.qb.push("\n").push(select);
        self.qb
    }
}

/// The outcome's attempt history as the `history` column holds it.
fn history(outcome: &Outcome) -> serde_json::Value {
    serde_json::Value::Array(
        outcome
            .history
            .iter()
            .map(|h| serde_json::json!({"at": h.at, "class": h.class, "message": pg_text(&h.message)}))
            .collect(),
    )
}

/// A job's commit: the fenced status update, then [`push_fills`] and the notification, gated on it.
/// Runs as one statement; `Ok(false)`: the fence did not match (nothing was written).
pub(crate) async fn finish(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    outcome: &Outcome,
    attempt: i32,
) -> Result<bool, StoreError> {
    let history = history(outcome);
    let mut s = Statement::new(Gate::Fenced);
    s.part("upd")
        .push("UPDATE jobs SET status = ")
        .push_bind(outcome.status)
        .push(", error_class = ")
        .push_bind(outcome.error_class)
        .push(", error = ")
        .push_bind(outcome.message.as_deref().map(pg_text))
        .push(", history = history || ")
        .push_bind(history)
        .push("::jsonb, finished_at = now(), updated_at = now() WHERE job_id = ")
        .push_bind(job.job_id)
        .push(" AND status = 'executing' AND attempts = ")
        .push_bind(attempt)
        .push(" RETURNING job_id");
    s.close();
    push_fills(&mut s, job, outcome);
    // The user's notification, in the outcome's own statement (issue 15): never lost, never sent
    // for an outcome that was not recorded.
    crate::notify::push_job_outcome(&mut s, job.job_id, &job.alert, outcome);
    let updated: i64 = s
        .finish("SELECT count(*) FROM upd")
        .build_query_scalar()
        .fetch_one(conn)
        .await?;
    Ok(updated > 0)
}

/// The commit of a job whose start was not written (a paper job's first delivery: see
/// `worker::job::Start`): the job's row is inserted in its final state as the statement's `upd`
/// (attempt 1, started `running_for` before the statement), and the same parts as [`finish`]'s
/// are gated on it.
/// `Ok(false)`: the job already has a row (another delivery started or finished it), so nothing
/// was written, and the caller takes the usual path (start, execute again, commit).
pub(crate) async fn finish_first(
    conn: &mut sqlx::PgConnection,
    job: &Job,
    outcome: &Outcome,
    first: &FirstStart<'_>,
) -> Result<bool, StoreError> {
    let inserted: i64 = first_statement(job, outcome, first)
        .build_query_scalar()
        .fetch_one(conn)
        .await?;
    Ok(inserted > 0)
}

/// [`finish_first`]'s statement.
fn first_statement<'q>(
    job: &'q Job,
    outcome: &'q Outcome,
    first: &FirstStart<'q>,
) -> QueryBuilder<'q, Postgres> {
    let a = &job.alert;
    let mut s = Statement::new(Gate::Fenced);
    s.part("upd")
        .push(
            "INSERT INTO jobs (job_id, user_id, partition, entry_id, exchange, action, symbol, \
             alert, status, attempts, accepted_at, started_at, finished_at, updated_at, \
             error_class, error, history) VALUES (",
        )
        .push_bind(job.job_id)
        .push(", ")
        .push_bind(a.user_id)
        .push(", ")
        .push_bind(first.partition as i32)
        .push(", ")
        .push_bind(first.entry_id)
        .push(", ")
        .push_bind(a.exchange.as_str())
        .push(", ")
        .push_bind(a.action.as_str())
        .push(", ")
        .push_bind(a.symbol.as_str())
        .push(", ")
        .push_bind(serde_json::to_value(a).expect("alert serialises"))
        .push(", ")
        .push_bind(outcome.status)
        .push(", 1, ")
        .push_bind(job.accepted_at)
        .push(", ")
        // The server's clock, as every other start's `now()`: the job's execution before it.
        .push("now() - make_interval(secs => ")
        .push_bind(first.running_for.as_secs_f64())
        .push("), now(), now(), ")
        .push_bind(outcome.error_class)
        .push(", ")
        .push_bind(outcome.message.as_deref().map(pg_text))
        .push(", ")
        .push_bind(history(outcome))
        .push("::jsonb) ON CONFLICT (job_id) DO NOTHING RETURNING job_id");
    s.close();
    push_fills(&mut s, job, outcome);
    crate::notify::push_job_outcome(&mut s, job.job_id, &job.alert, outcome);
    s.finish("SELECT count(*) FROM upd")
}

/// What a job's row records of a delivery whose start was not written before it executed
/// ([`finish_first`]).
pub struct FirstStart<'a> {
    pub partition: u32,
    pub entry_id: &'a str,
    /// How long the delivery has been running: its `started_at` is the commit's `now()` less this.
    pub running_for: std::time::Duration,
}

/// A job's essential write, inside the caller's transaction: its trade rows, the broker orders it
/// left or cancelled and its position change, as one statement (none when there is nothing).
pub async fn record_fills(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    job: &Job,
    outcome: &Outcome,
) -> Result<(), StoreError> {
    let mut s = Statement::new(Gate::Always);
    push_fills(&mut s, job, outcome);
    if s.is_empty() {
        return Ok(());
    }
    s.finish("SELECT 1").build().execute(&mut **tx).await?;
    Ok(())
}

/// The parts of a job's essential write: a trade row per fill, the broker orders, the position.
pub(crate) fn push_fills<'q>(s: &mut Statement<'q>, job: &'q Job, outcome: &'q Outcome) {
    let fills = first_fill_per_leg(job, &outcome.fills);
    if !fills.is_empty() {
        push_trades(s, job, outcome, &fills);
    }
    let resting = last_state_per_order(&outcome.resting);
    let cancelled: Vec<&str> = outcome
        .cancelled
        .iter()
        .filter(|id| !resting.iter().any(|o| &o.client_order_id == *id))
        .map(String::as_str)
        .collect();
    if !cancelled.is_empty() {
        let gate = s.gate;
        s.part("bc")
            .push("UPDATE broker_orders SET state = 'cancelled', updated_at = now() WHERE client_order_id = ANY(")
            .push_bind(cancelled)
            .push(") AND state = 'open' AND user_id = ")
            .push_bind(job.alert.user_id)
            .push(" AND symbol = ")
            .push_bind(job.alert.symbol.as_str().to_string())
            .push(gate.and());
        s.close();
    }
    for (i, o) in resting.into_iter().enumerate() {
        push_resting(s, &format!("r{i}"), job, outcome, o);
    }
    push_position(s, job, outcome);
}

/// A leg recorded twice keeps its first fill (what `ON CONFLICT (job_id, leg) DO NOTHING` kept
/// when the trades were inserted one by one).
fn first_fill_per_leg<'a>(job: &Job, fills: &'a [Fill]) -> Vec<&'a Fill> {
    let mut seen: HashSet<(Uuid, Leg)> = HashSet::new();
    fills
        .iter()
        .filter(|f| seen.insert((f.of_job.unwrap_or(job.job_id), f.leg)))
        .collect()
}

/// An order left resting twice keeps its last state (what the upserts in sequence left).
fn last_state_per_order(resting: &[RestingOrder]) -> Vec<&RestingOrder> {
    let mut out: Vec<&RestingOrder> = Vec::with_capacity(resting.len());
    for o in resting {
        match out
            .iter_mut()
            .find(|k| k.client_order_id == o.client_order_id)
        {
            Some(kept) => *kept = o,
            None => out.push(o),
        }
    }
    out
}

/// The job's trade rows, in one `INSERT` whose rows take their ids in the order of the fills (a
/// reversal's close before its open), as the inserts in sequence did.
fn push_trades<'q>(s: &mut Statement<'q>, job: &'q Job, outcome: &'q Outcome, fills: &[&'q Fill]) {
    const COLUMNS: &str = "job_id, user_id, exchange, symbol, leg, side, quantity, price, client_order_id, exchange_order_id, status, environment, pnl, exit_reason, fee";
    let a = &job.alert;
    let gate = s.gate;
    let q = s.part("t");
    q.push("INSERT INTO trades (")
        .push(COLUMNS)
        .push(") SELECT ")
        .push(COLUMNS)
        .push(" FROM (VALUES ");
    for (n, f) in fills.iter().enumerate() {
        if n > 0 {
            q.push(", ");
        }
        q.push("(").push(n as i32).push(", ");
        let mut v = q.separated(", ");
        // A fill of an earlier job's order (a working entry this job cancelled) is that job's trade.
        v.push_bind(f.of_job.unwrap_or(job.job_id))
            .push_bind(a.user_id)
            .push_bind(a.exchange.as_str())
            .push_bind(a.symbol.as_str())
            .push_bind(f.leg.as_str())
            .push_bind(f.side.as_str())
            .push_bind(f.quantity)
            .push_bind(f.price)
            .push_bind(pg_text(&f.client_order_id))
            .push_bind(f.exchange_order_id.as_deref().map(pg_text))
            .push_bind(f.status)
            .push_bind(outcome.environment.as_str())
            .push_bind(f.pnl)
            .push_bind(f.exit_reason)
            .push_bind(f.fee);
        q.push(")");
    }
    q.push(") AS v (n, ")
        .push(COLUMNS)
        .push(") WHERE true")
        .push(gate.and())
        .push(" ORDER BY n ON CONFLICT (job_id, leg) DO NOTHING");
    s.close();
}

fn push_resting<'q>(
    s: &mut Statement<'q>,
    name: &str,
    job: &'q Job,
    outcome: &'q Outcome,
    o: &'q RestingOrder,
) {
    let a = &job.alert;
    let expires_at = (o.leg == Leg::Open).then(|| {
        // At most 30 days (`working_ttl_secs`): the sum cannot overflow.
        let ttl = crate::executor::working_ttl_secs(a) as i64;
        chrono::Utc::now() + chrono::Duration::seconds(ttl)
    });
    let gate = s.gate;
    let q = s.part(name);
    q.push(
        "INSERT INTO broker_orders (client_order_id, job_id, user_id, exchange, environment, symbol, leg, side, quantity, price, exchange_order_id, state, expires_at) SELECT ",
    );
    let mut v = q.separated(", ");
    v.push_bind(pg_text(&o.client_order_id))
        .push_bind(job.job_id)
        .push_bind(a.user_id)
        .push_bind(a.exchange.as_str())
        .push_bind(outcome.environment.as_str())
        .push_bind(a.symbol.as_str())
        .push_bind(o.leg.as_str())
        .push_bind(o.side.as_str())
        .push_bind(o.quantity)
        .push_bind(o.price)
        .push_bind(o.exchange_order_id.as_deref().map(pg_text))
        .push("'open'")
        .push_bind(expires_at);
    q.push(gate.from()).push(
        " ON CONFLICT (client_order_id) DO UPDATE SET \
               exchange_order_id = EXCLUDED.exchange_order_id, quantity = EXCLUDED.quantity, \
               price = EXCLUDED.price, state = 'open', updated_at = now()",
    );
    s.close();
}

fn push_position<'q>(s: &mut Statement<'q>, job: &'q Job, outcome: &'q Outcome) {
    let a = &job.alert;
    let gate = s.gate;
    match &outcome.position {
        PositionChange::Unchanged => {}
        PositionChange::Flat => {
            s.part("pos")
                .push("DELETE FROM positions WHERE user_id = ")
                .push_bind(a.user_id)
                .push(" AND exchange = ")
                .push_bind(a.exchange.as_str())
                .push(" AND environment = ")
                .push_bind(outcome.environment.as_str())
                .push(" AND symbol = ")
                .push_bind(a.symbol.as_str())
                .push(gate.and());
            s.close();
        }
        PositionChange::Open {
            side,
            quantity,
            entry_price,
            stop_loss_price,
            take_profit_price,
        } => {
            let q = s.part("pos");
            q.push(
                "INSERT INTO positions (user_id, symbol, exchange, side, quantity, entry_price, stop_loss_price, take_profit_price, last_job_id, environment) SELECT ",
            );
            let mut v = q.separated(", ");
            v.push_bind(a.user_id)
                .push_bind(a.symbol.as_str())
                .push_bind(a.exchange.as_str())
                .push_bind(side.as_str())
                .push_bind(*quantity)
                .push_bind(*entry_price)
                .push_bind(*stop_loss_price)
                .push_bind(*take_profit_price)
                .push_bind(job.job_id)
                .push_bind(outcome.environment.as_str());
            q.push(gate.from()).push(
                " ON CONFLICT (user_id, exchange, environment, symbol) DO UPDATE SET \
                   side = EXCLUDED.side, quantity = EXCLUDED.quantity, \
                   entry_price = EXCLUDED.entry_price, stop_loss_price = EXCLUDED.stop_loss_price, \
                   take_profit_price = EXCLUDED.take_profit_price, last_job_id = EXCLUDED.last_job_id, \
                   opened_at = now(), updated_at = now()",
            );
            s.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{CredentialEnv, OrderSide, Side};
    use crate::job::{FillState, JobStatus};
    use rust_decimal_macros::dec;

    fn job() -> Job {
        let body = serde_json::json!({"user_id": "0195f3d0-0000-7000-8000-000000000001",
            "exchange": "Paper", "action": "buy", "symbol": "ETHUSDT", "position_size_usd": 100});
        Job {
            job_id: Uuid::now_v7(),
            accepted_at: chrono::Utc::now(),
            alert: crate::domain::parse_alert(body.as_object().unwrap(), None).unwrap(),
        }
    }

    fn fill(leg: Leg, quantity: rust_decimal::Decimal) -> Fill {
        Fill {
            leg,
            side: OrderSide::Buy,
            quantity,
            price: Some(dec!(3000)),
            client_order_id: format!("c-{}", leg.as_str()),
            exchange_order_id: None,
            status: FillState::Filled,
            pnl: None,
            exit_reason: None,
            fee: None,
            of_job: None,
        }
    }

    fn resting(id: &str, quantity: rust_decimal::Decimal) -> RestingOrder {
        RestingOrder {
            leg: Leg::StopLoss,
            client_order_id: id.into(),
            exchange_order_id: None,
            side: OrderSide::Sell,
            quantity,
            price: Some(dec!(2900)),
        }
    }

    fn full() -> Outcome {
        let earlier = Uuid::now_v7();
        Outcome {
            fills: vec![
                fill(Leg::Close, dec!(1)),
                fill(Leg::Open, dec!(2)),
                fill(Leg::Open, dec!(3)),
                // the same leg of another job (a partly filled entry this job took over): kept
                Fill {
                    of_job: Some(earlier),
                    ..fill(Leg::Open, dec!(4))
                },
            ],
            resting: vec![resting("s1", dec!(2)), resting("s1", dec!(1.5))],
            cancelled: vec!["old".into(), "s1".into()],
            position: PositionChange::Open {
                side: Side::Long,
                quantity: dec!(2),
                entry_price: dec!(3000),
                stop_loss_price: None,
                take_profit_price: None,
            },
            environment: CredentialEnv::Sandbox,
            ..Outcome::new(JobStatus::Succeeded, "")
        }
    }

    #[test]
    fn a_leg_keeps_its_first_fill_and_an_order_its_last_state() {
        let j = job();
        let o = full();
        let fills = first_fill_per_leg(&j, &o.fills);
        let kept: Vec<_> = fills.iter().map(|f| (f.leg, f.quantity)).collect();
        assert_eq!(
            kept,
            vec![
                (Leg::Close, dec!(1)),
                (Leg::Open, dec!(2)),
                (Leg::Open, dec!(4))
            ]
        );
        let orders = last_state_per_order(&o.resting);
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0].quantity, dec!(1.5));
    }

    /// The parts of a built statement (`name AS (..)`, separated as [`Statement::part`] writes
    /// them) and their names.
    fn parts_of(sql: &str) -> (Vec<&str>, Vec<&str>) {
        let parts: Vec<&str> = sql.split(",\n     ").collect();
        let names = parts
            .iter()
            .map(|p| p.trim_start_matches("WITH ").split(' ').next().unwrap())
            .collect();
        (parts, names)
    }

    #[test]
    fn every_part_of_a_fenced_commit_reads_the_fence() {
        let j = job();
        let o = full();
        let mut s = Statement::new(Gate::Fenced);
        s.part("upd")
            .push("UPDATE jobs SET status = 'x' RETURNING job_id");
        s.close();
        push_fills(&mut s, &j, &o);
        let sql = s.finish("SELECT count(*) FROM upd").into_sql();
        // upd, the trades (three rows), the cancel of `old` only (s1 is left resting), one order,
        // the position
        let (parts, _) = parts_of(&sql);
        assert_eq!(parts.len(), 5, "{sql}");
        assert_eq!(parts[1].matches("), (").count(), 2, "three rows: {sql}");
        assert!(parts[2].contains("client_order_id = ANY("), "{sql}");
        for part in &parts[1..] {
            assert!(
                part.contains("FROM upd"),
                "a part not gated on the fence: {part}"
            );
        }
    }

    #[test]
    fn a_commit_without_a_recorded_start_inserts_the_job_and_gates_every_part_on_the_insert() {
        let j = job();
        let o = full();
        let first = FirstStart {
            partition: 3,
            entry_id: "1-0",
            running_for: std::time::Duration::from_millis(2),
        };
        let sql = first_statement(&j, &o, &first).into_sql();
        let (parts, names) = parts_of(&sql);
        assert!(
            parts[0].starts_with("WITH upd AS (INSERT INTO jobs")
                && parts[0].ends_with("ON CONFLICT (job_id) DO NOTHING RETURNING job_id)"),
            "{sql}"
        );
        // the trades, the cancel, the resting order, the position and the notification, as in a
        // fenced commit: each gated on the insert (the event and its deliveries through `ch`)
        assert_eq!(
            names,
            ["upd", "t", "bc", "r0", "pos", "ch", "ev", "d"],
            "{sql}"
        );
        for part in &parts[1..6] {
            assert!(
                part.contains("FROM upd"),
                "a part not gated on the insert: {part}"
            );
        }
        assert!(
            parts[6].contains("WHERE EXISTS (SELECT 1 FROM ch)"),
            "{sql}"
        );
        assert!(parts[7].contains("FROM ev, ch"), "{sql}");
    }

    #[test]
    fn a_close_and_its_notification_are_gated_on_the_fence_too() {
        let j = job();
        let o = Outcome {
            fills: vec![fill(Leg::Close, dec!(1))],
            position: PositionChange::Flat,
            ..Outcome::new(JobStatus::Succeeded, "")
        };
        let mut s = Statement::new(Gate::Fenced);
        s.part("upd")
            .push("UPDATE jobs SET status = 'x' RETURNING job_id");
        s.close();
        push_fills(&mut s, &j, &o);
        crate::notify::push_job_outcome(&mut s, j.job_id, &j.alert, &o);
        let sql = s.finish("SELECT count(*) FROM upd").into_sql();
        let (parts, names) = parts_of(&sql);
        assert_eq!(names, ["upd", "t", "pos", "ch", "ev", "d"], "{sql}");
        assert!(
            parts[2].starts_with("pos AS (DELETE FROM positions"),
            "{sql}"
        );
        for part in &parts[1..4] {
            assert!(
                part.contains("EXISTS (SELECT 1 FROM upd)"),
                "a part not gated on the fence: {part}"
            );
        }
        // The event and its deliveries exist only if `ch` (gated) returned a channel.
        assert!(
            parts[4].contains("WHERE EXISTS (SELECT 1 FROM ch)"),
            "{sql}"
        );
        assert!(parts[5].contains("FROM ev, ch"), "{sql}");
    }

    #[test]
    fn an_ungated_write_has_no_fence_and_nothing_to_write_is_no_statement() {
        let j = job();
        let o = full();
        let mut s = Statement::new(Gate::Always);
        push_fills(&mut s, &j, &o);
        let sql = s.finish("SELECT 1").into_sql();
        assert!(!sql.contains("FROM upd"), "{sql}");

        let skipped = Outcome::new(JobStatus::Skipped, "nothing");
        let mut s = Statement::new(Gate::Always);
        push_fills(&mut s, &j, &skipped);
        assert!(s.is_empty());
    }
}
