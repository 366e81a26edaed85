//! Issue 12: what Sparky leaves at the broker through an order's and a position's whole life
//! (accounts, protective orders, partial fills, working orders, reconciliation).

use rust_decimal_macros::dec;
use sparky::domain::{Account, CredentialEnv, ExchangeKind, Side};
use sparky::job::JobStatus;

use crate::fakes::*;

/// A user trading ETHUSDT on paper and on Aster: the two are different accounts, and a paper job
/// never "reverses" or closes the Aster position (nor the other way round).
#[tokio::test]
async fn positions_are_per_account_paper_never_touches_a_live_position() {
    let (fake, _, app, user, secret) = aster_app().await;
    app.set_credentials(user, "paper", "paper").await;
    let account = |exchange| Account {
        user_id: user,
        exchange,
        environment: CredentialEnv::Production,
    };

    let aster_buy = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    let paper_sell = app
        .enqueue(&webhook(user, &secret, "paper", "sell", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(aster_buy).await.status, JobStatus::Succeeded);
    let paper = app.job(paper_sell).await;
    assert_eq!(paper.status, JobStatus::Succeeded, "{paper:?}");
    // The paper sell opened a paper short; it did not close the Aster long.
    let trades = app.trades(user).await;
    let paper_legs: Vec<_> = trades
        .iter()
        .filter(|t| t.job_id == paper_sell)
        .map(|t| t.leg.as_str())
        .collect();
    assert_eq!(paper_legs, ["open"], "{trades:?}");
    let aster = app
        .store
        .position(&account(ExchangeKind::Aster), "ETHUSDT")
        .await
        .unwrap()
        .expect("the Aster long");
    assert_eq!((aster.side, aster.quantity), (Side::Long, dec!(0.033)));
    let paper_pos = app
        .store
        .position(&account(ExchangeKind::Paper), "ETHUSDT")
        .await
        .unwrap()
        .expect("the paper short");
    assert_eq!(paper_pos.side, Side::Short);

    // A paper close closes the paper short only.
    let paper_close = app
        .enqueue(&webhook(user, &secret, "paper", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(paper_close).await.status, JobStatus::Succeeded);
    assert!(app
        .store
        .position(&account(ExchangeKind::Paper), "ETHUSDT")
        .await
        .unwrap()
        .is_none());
    assert!(app
        .store
        .position(&account(ExchangeKind::Aster), "ETHUSDT")
        .await
        .unwrap()
        .is_some());
    // Nothing was sent to Aster for the paper jobs: one order (the Aster buy).
    assert_eq!(fake.orders().len(), 1);
}
