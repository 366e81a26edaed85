//! Issue 12: what Sparky leaves at the broker through an order's and a position's whole life
//! (accounts, protective orders, partial fills, working orders, reconciliation).

use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::json;
use sparky::domain::{Account, Action, CredentialEnv, ExchangeKind, Job, OrderType, Side};
use sparky::exchanges::{client_order_id, Leg};
use sparky::executor::{execute, PositionChange};
use sparky::job::{ExitReason, JobStatus};

use crate::fakes::*;
use crate::helpers::*;

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

// ---------------------------------------------------------------------------------------------
// Protective orders: recorded, cancelled before a close or a reversal, resized after a partial
// close. Client-level (the executor over the real client, against the fake broker).
// ---------------------------------------------------------------------------------------------

fn with_protection(mut j: Job, sl: Decimal, tp: Decimal) -> Job {
    j.alert.stop_loss_percent = Some(sl);
    j.alert.take_profit_percent = Some(tp);
    j
}

#[tokio::test]
async fn aster_close_cancels_the_positions_protection_and_records_pnl() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let buy = with_protection(
        job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100)),
        dec!(2),
        dec!(4),
    );
    let out = run(&ex, &buy).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let resting: Vec<_> = out
        .resting
        .iter()
        .map(|r| (r.leg, r.client_order_id.clone(), r.price))
        .collect();
    assert_eq!(
        resting,
        [
            (
                Leg::StopLoss,
                client_order_id(buy.job_id, Leg::StopLoss),
                Some(dec!(2940))
            ),
            (
                Leg::TakeProfit,
                client_order_id(buy.job_id, Leg::TakeProfit),
                Some(dec!(3120))
            ),
        ],
        "both protective orders are recorded with their ids and levels"
    );
    assert!(out.resting.iter().all(|r| r.exchange_order_id.is_some()));
    assert_eq!(fake.open_orders("ETHUSDT").len(), 2);

    // The price moves inside the band; the close cancels both, then closes at 3060.
    fake.set_price("ETHUSDT", dec!(3060));
    let close = job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(100));
    let out = run(&ex, &close).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert!(
        fake.open_orders("ETHUSDT").is_empty(),
        "no orphaned protection"
    );
    let mut cancelled = out.cancelled.clone();
    cancelled.sort();
    let mut want = vec![
        client_order_id(buy.job_id, Leg::StopLoss),
        client_order_id(buy.job_id, Leg::TakeProfit),
    ];
    want.sort();
    assert_eq!(cancelled, want);
    assert_eq!(fake.position("ETHUSDT"), dec!(0));
    let fill = &out.fills[0];
    assert_eq!((fill.leg, fill.quantity), (Leg::Close, dec!(0.033)));
    assert_eq!(fill.pnl, Some(dec!(1.98)), "(3060 - 3000) x 0.033");
    assert_eq!(fill.exit_reason, Some(ExitReason::Signal));
    // The leftover stop can no longer close a later position: a new long survives a drop to 2900.
    let again = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    assert_eq!(run(&ex, &again).await.status, JobStatus::Succeeded);
    fake.set_price("ETHUSDT", dec!(2900));
    assert!(fake.position("ETHUSDT") > dec!(0));
}

#[tokio::test]
async fn aster_reversal_cancels_the_old_protection_before_opening_and_protects_the_new_side() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let buy = with_protection(
        job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100)),
        dec!(2),
        dec!(4),
    );
    assert_eq!(run(&ex, &buy).await.status, JobStatus::Succeeded);
    let sell = with_protection(
        job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(100)),
        dec!(2),
        dec!(4),
    );
    let out = run(&ex, &sell).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(out.cancelled.len(), 2, "{out:?}");
    let open: Vec<String> = fake
        .open_orders("ETHUSDT")
        .iter()
        .map(|o| o["clientOrderId"].as_str().unwrap().to_string())
        .collect();
    let mut want = vec![
        client_order_id(sell.job_id, Leg::StopLoss),
        client_order_id(sell.job_id, Leg::TakeProfit),
    ];
    want.sort();
    let mut open_sorted = open.clone();
    open_sorted.sort();
    assert_eq!(open_sorted, want, "only the new short's protection rests");
    // The cancel came before the open: the close and the open follow both cancels in the log.
    let log: Vec<String> = fake
        .core
        .all_seen()
        .iter()
        .filter(|s| s.route == "DELETE /fapi/v1/order" || s.route == "POST /fapi/v1/order")
        .map(|s| format!("{} {} {}", s.route, s.query, s.body))
        .collect();
    let first_open = log
        .iter()
        .position(|l| l.contains(&client_order_id(sell.job_id, Leg::Open)))
        .unwrap();
    let cancels = log.iter().filter(|l| l.starts_with("DELETE")).count();
    assert_eq!(cancels, 2, "{log:?}");
    assert!(
        log.iter()
            .take(first_open)
            .filter(|l| l.starts_with("DELETE"))
            .count()
            == 2,
        "both cancels before the new side's order: {log:?}"
    );
    assert_eq!(fake.position("ETHUSDT"), dec!(-0.033));
}

/// A close or a reversal lists the broker's open orders once, and once more only to confirm the
/// cancels it made: two listings with protection to cancel, one without.
#[tokio::test]
async fn aster_close_and_reversal_list_open_orders_once_plus_the_confirmation() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let listings = || fake.core.seen("GET /fapi/v1/openOrders").len();
    let step = |action: Action, protect: bool| {
        let j = job(ExchangeKind::Aster, action, "ETHUSDT", dec!(100));
        if protect {
            with_protection(j, dec!(2), dec!(4))
        } else {
            j
        }
    };
    for (action, protect, want) in [
        (Action::Buy, true, 1),    // nothing to cancel: one listing
        (Action::Sell, false, 2),  // reversal: the buy's protection found, cancelled, confirmed
        (Action::Close, false, 1), // nothing to cancel
        (Action::Buy, true, 1),
        (Action::Close, false, 2), // close: protection found, cancelled, confirmed
    ] {
        let before = listings();
        let out = run(&ex, &step(action, protect)).await;
        assert_eq!(out.status, JobStatus::Succeeded, "{action:?}: {out:?}");
        assert_eq!(listings() - before, want, "{action:?}");
    }
    assert!(fake.open_orders("ETHUSDT").is_empty());
    assert_eq!(fake.position("ETHUSDT"), Decimal::ZERO);
}

#[tokio::test]
async fn aster_partial_open_is_recorded_as_filled_and_protected_for_that_much() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    fake.partial_next(dec!(0.5));
    let buy = with_protection(
        job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(200)),
        dec!(2),
        dec!(4),
    );
    let out = run(&ex, &buy).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert!(
        out.message
            .as_deref()
            .unwrap_or("")
            .contains("partially filled"),
        "{out:?}"
    );
    assert_eq!(out.fills[0].quantity, dec!(0.033));
    match &out.position {
        PositionChange::Open { quantity, .. } => assert_eq!(*quantity, dec!(0.033)),
        other => panic!("{other:?}"),
    }
    assert!(
        out.resting.iter().all(|r| r.quantity == dec!(0.033)),
        "{out:?}"
    );
    assert_eq!(fake.position("ETHUSDT"), dec!(0.033));
}

#[tokio::test]
async fn aster_close_percent_closes_part_and_re_protects_the_remainder() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let buy = with_protection(
        job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(400)),
        dec!(2),
        dec!(4),
    );
    assert_eq!(run(&ex, &buy).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("ETHUSDT"), dec!(0.133));
    let mut half = job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1));
    half.alert.close_percent = Some(dec!(50));
    let out = run(&ex, &half).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    // 50% of 0.133 = 0.0665, rounded down to the step 0.001: 0.066 closed, 0.067 remain.
    assert_eq!(out.fills[0].quantity, dec!(0.066));
    assert_eq!(fake.position("ETHUSDT"), dec!(0.067));
    match &out.position {
        PositionChange::Open {
            quantity,
            stop_loss_price,
            take_profit_price,
            ..
        } => {
            assert_eq!(*quantity, dec!(0.067));
            assert_eq!(
                (*stop_loss_price, *take_profit_price),
                (Some(dec!(2940)), Some(dec!(3120)))
            );
        }
        other => panic!("{other:?}"),
    }
    let open: Vec<String> = fake
        .open_orders("ETHUSDT")
        .iter()
        .map(|o| o["clientOrderId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(open.len(), 2, "{open:?}");
    assert!(
        open.iter()
            .all(|id| id.starts_with(&format!("sp{}", half.job_id.simple()))),
        "the remainder's protection is the close job's own: {open:?}"
    );

    // A share that rounds down to nothing is refused before anything is sent.
    let mut tiny = job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1));
    tiny.alert.close_percent = Some(dec!(1));
    let out = run(&ex, &tiny).await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(
        out.message
            .as_deref()
            .unwrap_or("")
            .contains("rounds down to 0"),
        "{out:?}"
    );
    assert_eq!(fake.position("ETHUSDT"), dec!(0.067));
}

#[tokio::test]
async fn tradier_reversal_whose_close_fills_partly_closes_the_rest_and_cancels_the_oco() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let buy = with_protection(
        job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(2000)),
        dec!(5),
        dec!(5),
    );
    let out = run(&ex, &buy).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let held = fake.position("AAPL");
    assert!(held > dec!(0));
    assert_eq!(fake.open_orders().len(), 1, "one OCO");
    // The reversal's first close fills 60%.
    fake.partial_next(dec!(0.6));
    let sell = job(ExchangeKind::Tradier, Action::Sell, "AAPL", dec!(2000));
    let out = run(&ex, &sell).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let legs: Vec<Leg> = out.fills.iter().map(|f| f.leg).collect();
    assert_eq!(legs, [Leg::Close, Leg::Close2, Leg::Open], "{out:?}");
    let closed: Decimal = out
        .fills
        .iter()
        .filter(|f| f.leg.is_close())
        .map(|f| f.quantity)
        .sum();
    assert_eq!(closed, held);
    assert_eq!(fake.position("AAPL"), -out.fills[2].quantity);
    assert!(fake.open_orders().is_empty(), "the OCO was cancelled");
    assert_eq!(out.cancelled, [client_order_id(buy.job_id, Leg::StopLoss)]);
}

#[tokio::test]
async fn oanda_close_takes_the_trades_on_fill_orders_with_it() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let buy = with_protection(
        job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(1000)),
        dec!(1),
        dec!(1),
    );
    assert_eq!(run(&ex, &buy).await.status, JobStatus::Succeeded);
    assert_eq!(
        fake.pending_orders().len(),
        2,
        "stop-loss and take-profit on the trade"
    );
    let close = job(ExchangeKind::Oanda, Action::Close, "EUR_USD", dec!(1));
    let out = run(&ex, &close).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(fake.position("EUR_USD"), dec!(0));
    assert!(
        fake.pending_orders().is_empty(),
        "OANDA cancelled the trade's dependent orders (LINKED_TRADE_CLOSED)"
    );
    assert!(
        fake.core.seen("PUT /orders/{spec}/cancel").is_empty(),
        "Sparky sent no cancel for them"
    );
    // They are recorded as gone with the trade (their `broker_orders` rows end `cancelled`).
    let mut gone = out.cancelled.clone();
    gone.sort();
    assert_eq!(
        gone,
        [
            client_order_id(buy.job_id, Leg::StopLoss),
            client_order_id(buy.job_id, Leg::TakeProfit)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Working entries and recovery
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unfilled_limit_entry_is_working_and_the_next_alert_cancels_it_first() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let mut entry = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    entry.alert.order_type = OrderType::Limit;
    entry.alert.price = Some(dec!(2900));
    entry.alert.limit_ttl_secs = Some(600);
    let out = run(&ex, &entry).await;
    assert_eq!(out.status, JobStatus::Working, "{out:?}");
    assert!(
        out.fills.is_empty(),
        "nothing filled, nothing recorded as a trade"
    );
    assert_eq!(out.resting.len(), 1);
    assert_eq!(out.resting[0].leg, Leg::Open);
    assert_eq!(out.position, PositionChange::Unchanged);
    assert_eq!(fake.open_orders("ETHUSDT").len(), 1);

    // A later market sell: the working buy is cancelled before anything else.
    let sell = job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(100));
    let out = run(&ex, &sell).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(out.cancelled, [client_order_id(entry.job_id, Leg::Open)]);
    assert!(fake.open_orders("ETHUSDT").is_empty());
    assert_eq!(fake.position("ETHUSDT"), dec!(-0.033));
}

#[tokio::test]
async fn a_redelivered_job_whose_open_was_placed_places_the_missing_protection() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let buy = with_protection(
        job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100)),
        dec!(2),
        dec!(4),
    );
    // The first delivery's open reached the broker, then the worker died (simulated: the order
    // is placed directly with the job's open id).
    let (s, body) = aster_call(
        &url,
        "POST",
        "/fapi/v1/order",
        &[
            ("symbol", "ETHUSDT"),
            ("side", "BUY"),
            ("type", "MARKET"),
            ("quantity", "0.033"),
            ("newClientOrderId", &client_order_id(buy.job_id, Leg::Open)),
        ],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let out = execute(&ex, &buy, true, &fast_policy()).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(out.fills.len(), 1);
    assert_eq!(
        fake.orders_with(&client_order_id(buy.job_id, Leg::Open)),
        1,
        "not sent again"
    );
    assert_eq!(out.resting.len(), 2, "{out:?}");
    assert_eq!(
        fake.open_orders("ETHUSDT").len(),
        2,
        "the protection is in place"
    );
    // A second redelivery finds both and sends nothing more.
    let out = execute(&ex, &buy, true, &fast_policy()).await;
    assert_eq!(out.resting.len(), 2, "{out:?}");
    assert_eq!(fake.open_orders("ETHUSDT").len(), 2);
    assert_eq!(
        fake.orders_with(&client_order_id(buy.job_id, Leg::StopLoss)),
        1
    );
}

/// End to end: the close's fill carries its PnL in `trades`, and `broker_orders` follows the
/// protective orders from open to cancelled.
#[tokio::test]
async fn e2e_protection_is_recorded_and_marked_cancelled_with_pnl_on_the_close() {
    let (fake, _, app, user, secret) = aster_app().await;
    let mut hook = webhook(user, &secret, "aster", "buy", "ETHUSDT", 100);
    hook["stop_loss_percent"] = json!(2);
    hook["take_profit_percent"] = json!(4);
    let buy = app.enqueue(&hook).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status, JobStatus::Succeeded);
    let states = broker_order_states(&app, buy).await;
    assert_eq!(
        states,
        [("sl".into(), "open".into()), ("tp".into(), "open".into())]
    );

    fake.set_price("ETHUSDT", dec!(2970));
    let close = app
        .enqueue(&webhook(user, &secret, "aster", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(close).await.status, JobStatus::Succeeded);
    let states = broker_order_states(&app, buy).await;
    assert_eq!(
        states,
        [
            ("sl".into(), "cancelled".into()),
            ("tp".into(), "cancelled".into())
        ]
    );
    let pnl: Option<Decimal> = sqlx::query_scalar(
        "SELECT pnl FROM trades WHERE job_id = $1 AND leg = 'close' AND exit_reason = 'signal'",
    )
    .bind(close)
    .fetch_one(&app.store.pool)
    .await
    .unwrap();
    assert_eq!(pnl, Some(dec!(-0.99)), "(2970 - 3000) x 0.033");
    assert!(fake.open_orders("ETHUSDT").is_empty());
}

async fn broker_order_states(app: &TestApp, job: uuid::Uuid) -> Vec<(String, String)> {
    sqlx::query_as("SELECT leg, state FROM broker_orders WHERE job_id = $1 ORDER BY leg")
        .bind(job)
        .fetch_all(&app.store.pool)
        .await
        .unwrap()
}
