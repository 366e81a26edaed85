//! Group commit ([`sparky::store::Commits`]): the commits of concurrent lanes written as one
//! statement answer each job, and leave each job's rows, exactly as its own commit would.

use std::sync::atomic::Ordering::Relaxed;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sparky::domain::{Job, OrderSide, Side};
use sparky::exchanges::Leg;
use sparky::executor::{Fill, Outcome, PositionChange};
use sparky::job::{FillState, JobStatus};
use sparky::store::{Commits, StoreError};
use uuid::Uuid;

use crate::helpers::*;
use crate::trader::paper_job;

/// A paper open of `quantity` SOL at 100: one trade, the position.
fn opened(quantity: Decimal) -> Outcome {
    Outcome {
        fills: vec![Fill {
            leg: Leg::Open,
            side: OrderSide::Buy,
            quantity,
            price: Some(dec!(100)),
            client_order_id: format!("c-{}", Uuid::now_v7().simple()),
            exchange_order_id: None,
            status: FillState::Filled,
            pnl: None,
            exit_reason: None,
            fee: None,
            of_job: None,
        }],
        position: PositionChange::Open {
            side: Side::Long,
            quantity: dec!(1),
            entry_price: dec!(100),
            stop_loss_price: None,
            take_profit_price: None,
        },
        ..Outcome::new(JobStatus::Succeeded, "")
    }
}

/// What one wave commits: (job, outcome, attempt) per lane, in the order they reach the commit.
/// Every job is begun once (attempt 1).
struct Wave {
    commits: Vec<(Job, Outcome, i32)>,
}

/// Users `u[0..6]`; `refused`: one more commit whose trade Postgres refuses (`quantity > 0`).
async fn wave(app: &TestApp, refused: bool) -> Wave {
    let mut users = Vec::new();
    for _ in 0..6 {
        users.push(app.paper_user().await);
    }
    let job = |i: usize, symbol: &str| paper_job(users[i].0, &users[i].1, "buy", None, symbol);
    let mut commits = vec![
        (job(0, "SOLUSDT"), opened(dec!(1)), 1),
        (job(1, "SOLUSDT"), opened(dec!(1)), 1),
        // a skip: another shape, another statement
        (
            job(2, "SOLUSDT"),
            Outcome::new(JobStatus::Skipped, "a position is already open"),
            1,
        ),
        // a delivery that was overtaken (the job was begun again since): nothing of it written
        (job(3, "SOLUSDT"), opened(dec!(1)), 0),
        (job(4, "SOLUSDT"), opened(dec!(1)), 1),
        // a second job of user 0 (its lane would commit it after the first): never in the
        // same statement as the first, which upserts the same position row
        (job(0, "SOLUSDT"), opened(dec!(1)), 1),
        (job(5, "ETHUSDT"), opened(dec!(2)), 1),
    ];
    if refused {
        let (user, secret) = app.paper_user().await;
        commits.insert(
            2,
            (
                paper_job(user, &secret, "buy", None, "SOLUSDT"),
                opened(dec!(0)),
                1,
            ),
        );
    }
    for (j, _, _) in &commits {
        app.store.begin_job(j, 0, "0-1").await.unwrap();
    }
    Wave { commits }
}

/// A job's rows after its commit: status, error, its trades and its user's positions.
async fn recorded(app: &TestApp, job: &Job) -> String {
    let status: (String, Option<String>, Option<String>) =
        sqlx::query_as("SELECT status, error_class, error FROM jobs WHERE job_id = $1")
            .bind(job.job_id)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    let trades: Vec<(String, String, Decimal, Option<Decimal>, String)> = sqlx::query_as(
        "SELECT leg, side, quantity, price, status FROM trades WHERE job_id = $1 ORDER BY id",
    )
    .bind(job.job_id)
    .fetch_all(&app.store.pool)
    .await
    .unwrap();
    let positions: Vec<(String, String, Decimal, Decimal)> = sqlx::query_as(
        "SELECT symbol, side, quantity, entry_price FROM positions WHERE user_id = $1 ORDER BY symbol",
    )
    .bind(job.alert.user_id)
    .fetch_all(&app.store.pool)
    .await
    .unwrap();
    format!("{status:?} {trades:?} {positions:?}")
}

/// Each job of a wave committed together gets the answer, and leaves the rows, that its own
/// `Store::finish_job` gives in a twin wave committed one by one: recorded, or `Superseded` for
/// an overtaken delivery (which writes nothing); a second job of one user is never in the same
/// statement as the first; and a job whose data Postgres refuses fails its own commit only, the
/// others of its statement committing on their own.
#[tokio::test]
async fn commits_written_together_answer_and_write_what_each_commit_alone_does() {
    let app = TestApp::spawn().await;
    let commits = Commits::new(app.store.clone());
    for refused in [false, true] {
        let alone = wave(&app, refused).await;
        let mut expected = Vec::new();
        for (j, o, attempt) in &alone.commits {
            expected.push(app.store.finish_job(j, o, *attempt).await);
        }
        let together = wave(&app, refused).await;
        let stats = commits.stats();
        let (statements, jobs, fell_back) = (
            stats.statements.load(Relaxed),
            stats.jobs.load(Relaxed),
            stats.alone.load(Relaxed),
        );
        // Every lane reaches its commit at once.
        let got = futures::future::join_all(
            together
                .commits
                .iter()
                .map(|(j, o, attempt)| commits.finish(j, o, *attempt)),
        )
        .await;
        for (i, (want, got)) in expected.iter().zip(&got).enumerate() {
            match (want, got) {
                (Ok(()), Ok(())) => {}
                (Err(StoreError::Superseded(_)), Err(StoreError::Superseded(_))) => {}
                (Err(w), Err(g)) if w.is_data_error() && g.is_data_error() => {}
                _ => panic!("commit {i} (refused: {refused}): alone {want:?}, together {got:?}"),
            }
            let (a, t) = (&alone.commits[i].0, &together.commits[i].0);
            assert_eq!(
                recorded(&app, a).await,
                recorded(&app, t).await,
                "commit {i} (refused: {refused})"
            );
        }
        assert!(
            matches!(got[if refused { 4 } else { 3 }], Err(StoreError::Superseded(_))),
            "{got:?}"
        );
        let ran = stats.statements.load(Relaxed) - statements;
        let fell_back = stats.alone.load(Relaxed) - fell_back;
        assert_eq!(
            stats.jobs.load(Relaxed) - jobs,
            together.commits.len() as u64,
            "every commit went through the statements"
        );
        if refused {
            assert!(
                got[2].as_ref().is_err_and(|e| e.is_data_error()),
                "{got:?}"
            );
            assert!(fell_back >= 2, "the refused statement's jobs committed alone");
        } else {
            // The opens of users 0, 1, 3, 4 and 5's ETH (all one shape) share a statement; the
            // skip and user 0's second job are written in others.
            assert_eq!(fell_back, 0, "no statement failed");
            assert!(
                ran < together.commits.len() as u64,
                "{ran} statements for {} commits",
                together.commits.len()
            );
        }
    }
    app.cleanup().await;
}
