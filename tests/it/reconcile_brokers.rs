//! Issue 12 items 4 and 5 on OANDA and Tradier (the Aster ones are in `reconcile.rs`): working
//! entries followed to a fill or to their expiry, stops fired at the broker recorded as `sl`
//! trades, orphans cancelled, drift reported; and Tradier's GTC orders of an earlier day, which its
//! `/orders` listing no longer shows, found by the ids Sparky recorded.

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::Side;
use sparky::exchanges::{client_order_id, Leg};
use sparky::job::{ExitReason, JobStatus};
use sparky::reconcile::{DriftKind, Finding, Held};
use uuid::Uuid;

use crate::fakes::*;
use crate::helpers::*;

async fn row_state(app: &TestApp, coid: &str) -> String {
    sqlx::query_scalar("SELECT state FROM broker_orders WHERE client_order_id = $1")
        .bind(coid)
        .fetch_one(&app.store.pool)
        .await
        .unwrap()
}

fn hook(
    user: Uuid,
    secret: &str,
    exchange: &str,
    action: &str,
    symbol: &str,
    usd: u32,
    levels: Option<(u32, u32)>,
) -> Value {
    let mut h = webhook(user, secret, exchange, action, symbol, usd);
    if let Some((sl, tp)) = levels {
        h["stop_loss_percent"] = json!(sl);
        h["take_profit_percent"] = json!(tp);
    }
    h
}

fn limit(mut h: Value, price: Decimal) -> Value {
    h["order_type"] = json!("limit");
    h["price"] = json!(price);
    h["limit_ttl_secs"] = json!(600);
    h
}

fn held(side: Side, quantity: Decimal) -> Option<Held> {
    Some(Held { side, quantity })
}

// ---------------------------------------------------------------------------------------------
// OANDA
// ---------------------------------------------------------------------------------------------

/// A working OANDA limit entry fills when the price crosses it: the follower records the open, the
/// position and the stop-loss / take-profit that came with the fill (OANDA's on-fill orders,
/// recorded under the job's `sl` / `tp` ids). The stop then fires at OANDA: the sweep records it as
/// the job's `sl` trade with its PnL, the take-profit OANDA cancelled with the trade is marked
/// gone, there is no drift, and the next buy opens a new position.
#[tokio::test]
async fn oanda_working_entry_fills_then_its_stop_fires_and_the_next_buy_opens() {
    let (fake, _url, app, user, secret) = oanda_app().await;
    let entry = app
        .run_expecting(
            &limit(
                hook(user, &secret, "oanda", "buy", "EUR_USD", 100, Some((2, 4))),
                dec!(1.08),
            ),
            JobStatus::Working,
        )
        .await;
    assert_eq!(fake.position("EUR_USD"), Decimal::ZERO, "resting");
    assert!(
        reconcile_findings(&app, user).await.is_empty(),
        "not crossed yet"
    );

    fake.set_price("EUR_USD", dec!(1.079));
    assert_eq!(fake.position("EUR_USD"), dec!(92), "filled at the limit");
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryFilled {
            symbol: "EUR_USD".into(),
            job_id: entry,
            quantity: dec!(92),
            price: Some(dec!(1.08)),
            status: JobStatus::Succeeded,
        }]
    );
    let sl = client_order_id(entry, Leg::StopLoss);
    let tp = client_order_id(entry, Leg::TakeProfit);
    assert_eq!(row_state(&app, &sl).await, "open");
    assert_eq!(row_state(&app, &tp).await, "open");
    let pos = app.position(user, "EUR_USD").await.unwrap();
    assert_eq!(
        (pos.side, pos.quantity, pos.entry_price),
        (Side::Long, dec!(92), dec!(1.08))
    );
    assert!(reconcile_findings(&app, user).await.is_empty(), "in line");

    // The stop (1.0584) fires at 1.05; OANDA cancels the take-profit with the trade.
    fake.set_price("EUR_USD", dec!(1.05));
    assert_eq!(fake.position("EUR_USD"), Decimal::ZERO);
    assert_eq!(
        reconcile_findings(&app, user).await,
        [
            Finding::ProtectionFilled {
                symbol: "EUR_USD".into(),
                job_id: entry,
                client_order_id: sl.clone(),
                exit_reason: ExitReason::StopLoss,
                quantity: dec!(92),
                price: Some(dec!(1.05)),
                pnl: Some(dec!(-2.76)),
            },
            Finding::ProtectionGone {
                symbol: "EUR_USD".into(),
                client_order_id: tp.clone(),
            },
            Finding::PositionSynced {
                symbol: "EUR_USD".into(),
                sparky: held(Side::Long, dec!(92)),
                broker: None,
                drift: None,
            },
        ]
    );
    let (qty, price, pnl, reason, _) = trade_leg(&app, entry, "sl").await;
    assert_eq!(
        (qty, price, pnl, reason),
        (
            dec!(92),
            Some(dec!(1.05)),
            Some(dec!(-2.76)),
            Some(ExitReason::StopLoss)
        )
    );
    assert_eq!(row_state(&app, &sl).await, "filled");
    assert_eq!(row_state(&app, &tp).await, "cancelled");
    assert_eq!(app.position(user, "EUR_USD").await, None);

    // The next buy opens (it is not "already long"); its close records the on-fill orders gone
    // with the trade, so a sweep finds nothing to do.
    let again = app
        .run_expecting(
            &hook(user, &secret, "oanda", "buy", "EUR_USD", 100, Some((2, 4))),
            JobStatus::Succeeded,
        )
        .await;
    assert!(fake.position("EUR_USD") > Decimal::ZERO);
    assert_eq!(
        row_state(&app, &client_order_id(again, Leg::StopLoss)).await,
        "open"
    );
    app.run_expecting(
        &hook(user, &secret, "oanda", "close", "EUR_USD", 100, None),
        JobStatus::Succeeded,
    )
    .await;
    assert_eq!(
        row_state(&app, &client_order_id(again, Leg::StopLoss)).await,
        "cancelled"
    );
    assert_eq!(
        row_state(&app, &client_order_id(again, Leg::TakeProfit)).await,
        "cancelled"
    );
    assert!(fake.pending_orders().is_empty());
    assert!(reconcile_findings(&app, user).await.is_empty());
}

/// A working OANDA entry past its time is cancelled at OANDA (a cancelled order is "gone without
/// a fill", not an error) and the job ends `expired`.
#[tokio::test]
async fn oanda_working_entry_past_its_time_is_cancelled_and_the_job_expires() {
    let (fake, _url, app, user, secret) = oanda_app().await;
    let entry = app
        .run_expecting(
            &limit(
                hook(user, &secret, "oanda", "buy", "EUR_USD", 100, Some((2, 4))),
                dec!(1.08),
            ),
            JobStatus::Working,
        )
        .await;
    expire_working_entries_now(&app, entry).await;
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryExpired {
            symbol: "EUR_USD".into(),
            job_id: entry
        }]
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Expired);
    assert!(fake.pending_orders().is_empty(), "cancelled at OANDA");
    assert_eq!(
        fake.orders_with(&client_order_id(entry, Leg::Open))[0]["state"],
        "CANCELLED"
    );
    assert_eq!(
        row_state(&app, &client_order_id(entry, Leg::Open)).await,
        "cancelled"
    );
    fake.set_price("EUR_USD", dec!(1.07));
    assert_eq!(
        fake.position("EUR_USD"),
        Decimal::ZERO,
        "nothing fills later"
    );
    assert!(app.trades(user).await.is_empty());
}

/// The user closes the position by hand at OANDA: the trade's stop-loss and take-profit go with
/// it (OANDA cancels them, so there is no orphan to cancel on OANDA); the sweep marks them gone
/// and reports the close as drift.
#[tokio::test]
async fn oanda_hand_close_is_drift_and_the_trades_orders_are_marked_gone() {
    let (fake, url, app, user, secret) = oanda_app().await;
    app.run_expecting(
        &hook(user, &secret, "oanda", "buy", "EUR_USD", 100, Some((2, 4))),
        JobStatus::Succeeded,
    )
    .await;
    assert_eq!(fake.pending_orders().len(), 2);
    let (s, v) = oanda_call(
        &url,
        "PUT",
        "/positions/EUR_USD/close",
        Some(json!({"longUnits": "ALL"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(fake.pending_orders().is_empty());

    let found = reconcile_findings(&app, user).await;
    let gone: Vec<&Finding> = found
        .iter()
        .filter(|f| matches!(f, Finding::ProtectionGone { .. }))
        .collect();
    assert_eq!(gone.len(), 2, "{found:?}");
    assert_eq!(
        found.iter().filter_map(Finding::drift).collect::<Vec<_>>(),
        [DriftKind::Closed]
    );
    assert!(!found
        .iter()
        .any(|f| matches!(f, Finding::OrphanCancelled { .. })));
    assert_eq!(app.position(user, "EUR_USD").await, None);
    assert_eq!(app.trades(user).await.len(), 1, "no trade invented");
}

// ---------------------------------------------------------------------------------------------
// Tradier
// ---------------------------------------------------------------------------------------------

/// A working Tradier limit entry fills when the price crosses it: the follower records it and
/// places its OCO protection for what filled.
#[tokio::test]
async fn tradier_working_entry_fills_and_is_protected_by_the_follower() {
    let (fake, _url, app, user, secret) = tradier_app().await;
    let entry = app
        .run_expecting(
            &limit(
                hook(user, &secret, "tradier", "buy", "AAPL", 1000, Some((2, 4))),
                dec!(185),
            ),
            JobStatus::Working,
        )
        .await;
    assert!(
        reconcile_findings(&app, user).await.is_empty(),
        "not crossed yet"
    );

    fake.set_price("AAPL", dec!(184));
    assert_eq!(fake.position("AAPL"), dec!(5));
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryFilled {
            symbol: "AAPL".into(),
            job_id: entry,
            quantity: dec!(5),
            price: Some(dec!(185)),
            status: JobStatus::Succeeded,
        }]
    );
    let oco = fake.orders_tagged(&client_order_id(entry, Leg::StopLoss));
    assert_eq!(oco.len(), 1);
    assert_eq!(
        (oco[0]["class"].as_str(), oco[0]["status"].as_str()),
        (Some("oco"), Some("open"))
    );
    assert_eq!(
        oco[0]["leg"][0]["quantity"].as_f64(),
        Some(5.0),
        "for what filled"
    );
    let pos = app.position(user, "AAPL").await.unwrap();
    assert_eq!(
        (
            pos.side,
            pos.quantity,
            pos.stop_loss_price,
            pos.take_profit_price
        ),
        (Side::Long, dec!(5), Some(dec!(181.3)), Some(dec!(192.4)))
    );
    assert_eq!(
        row_state(&app, &client_order_id(entry, Leg::Open)).await,
        "filled"
    );
    assert!(reconcile_findings(&app, user).await.is_empty(), "in line");
}

/// A working Tradier entry past its time is cancelled at Tradier and the job ends `expired`.
#[tokio::test]
async fn tradier_working_entry_past_its_time_is_cancelled_and_the_job_expires() {
    let (fake, _url, app, user, secret) = tradier_app().await;
    let entry = app
        .run_expecting(
            &limit(
                hook(user, &secret, "tradier", "buy", "AAPL", 1000, None),
                dec!(185),
            ),
            JobStatus::Working,
        )
        .await;
    expire_working_entries_now(&app, entry).await;
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryExpired {
            symbol: "AAPL".into(),
            job_id: entry
        }]
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Expired);
    let order = &fake.orders_tagged(&client_order_id(entry, Leg::Open))[0];
    assert_eq!(order["status"], "canceled");
    assert!(fake.open_orders().is_empty());
    fake.set_price("AAPL", dec!(180));
    assert_eq!(fake.position("AAPL"), Decimal::ZERO, "nothing fills later");
}

/// The OCO's stop leg fires at Tradier: the sweep records the job's `sl` exit with its PnL (no fee:
/// Tradier reports none on orders), no drift, and the next buy opens a new long.
#[tokio::test]
async fn tradier_stop_fired_at_the_broker_is_recorded_and_the_next_buy_opens() {
    let (fake, _url, app, user, secret) = tradier_app().await;
    let buy = app
        .run_expecting(
            &hook(user, &secret, "tradier", "buy", "AAPL", 1000, Some((2, 4))),
            JobStatus::Succeeded,
        )
        .await;
    assert_eq!(fake.position("AAPL"), dec!(5));

    fake.set_price("AAPL", dec!(180));
    assert_eq!(
        fake.position("AAPL"),
        Decimal::ZERO,
        "the stop (186.2) fired"
    );
    let sl = client_order_id(buy, Leg::StopLoss);
    assert_eq!(
        reconcile_findings(&app, user).await,
        [
            Finding::ProtectionFilled {
                symbol: "AAPL".into(),
                job_id: buy,
                client_order_id: sl.clone(),
                exit_reason: ExitReason::StopLoss,
                quantity: dec!(5),
                price: Some(dec!(180)),
                pnl: Some(dec!(-50)),
            },
            Finding::PositionSynced {
                symbol: "AAPL".into(),
                sparky: held(Side::Long, dec!(5)),
                broker: None,
                drift: None,
            },
        ]
    );
    let (qty, price, pnl, reason, fee) = trade_leg(&app, buy, "sl").await;
    assert_eq!(
        (qty, price, pnl, reason, fee),
        (
            dec!(5),
            Some(dec!(180)),
            Some(dec!(-50)),
            Some(ExitReason::StopLoss),
            None
        )
    );
    assert_eq!(row_state(&app, &sl).await, "filled");
    assert_eq!(app.position(user, "AAPL").await, None);

    let again = app
        .enqueue(&hook(user, &secret, "tradier", "buy", "AAPL", 1000, None))
        .await;
    app.run_worker_until_idle().await;
    let row = app.job(again).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    assert_eq!(fake.position("AAPL"), dec!(5), "1000 USD at 180");
    let pos = app.position(user, "AAPL").await.unwrap();
    assert_eq!((pos.side, pos.quantity), (Side::Long, dec!(5)));
}

/// The user sells by hand at Tradier: Sparky's OCO is orphaned (nothing to protect) and
/// cancelled, and the close is drift.
#[tokio::test]
async fn tradier_orphaned_oco_is_cancelled_and_a_hand_close_is_drift() {
    let (fake, url, app, user, secret) = tradier_app().await;
    let buy = app
        .run_expecting(
            &hook(user, &secret, "tradier", "buy", "AAPL", 1000, Some((2, 4))),
            JobStatus::Succeeded,
        )
        .await;
    hand_sell(&url, "AAPL", 5).await;
    assert_eq!(fake.position("AAPL"), Decimal::ZERO);

    let sl = client_order_id(buy, Leg::StopLoss);
    let found = reconcile_findings(&app, user).await;
    assert_eq!(
        found,
        [
            Finding::OrphanCancelled {
                symbol: "AAPL".into(),
                client_order_id: sl.clone(),
            },
            Finding::PositionSynced {
                symbol: "AAPL".into(),
                sparky: held(Side::Long, dec!(5)),
                broker: None,
                drift: Some(DriftKind::Closed),
            },
        ]
    );
    assert_eq!(fake.orders_tagged(&sl)[0]["status"], "canceled");
    assert_eq!(row_state(&app, &sl).await, "cancelled");
    assert_eq!(app.position(user, "AAPL").await, None);
}

async fn hand_sell(url: &str, symbol: &str, qty: u32) {
    let q = qty.to_string();
    let (s, v) = tradier_call(
        url,
        "POST",
        "/orders",
        &[
            ("class", "equity"),
            ("symbol", symbol),
            ("side", "sell"),
            ("quantity", &q),
            ("type", "market"),
            ("duration", "day"),
            ("tag", "by-hand"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{v}");
}

/// Tradier's `/orders` lists the current session only: the GTC OCO protecting a position opened
/// yesterday is not in it today. The ids Sparky recorded are looked up by id
/// (`GET /orders/{id}`), so a close alert still cancels that OCO before it closes, and the
/// reconciliation still finds an orphaned one and cancels it.
#[tokio::test]
async fn tradier_protection_placed_yesterday_is_cancelled_by_a_close_and_as_an_orphan() {
    let (fake, url, app, user, secret) = tradier_app().await;
    let today = fake.today();
    fake.set_today(today - chrono::Days::new(1));
    let mut buys = vec![];
    for symbol in ["AAPL", "SPY"] {
        buys.push(
            app.enqueue(&hook(
                user,
                &secret,
                "tradier",
                "buy",
                symbol,
                1000,
                Some((2, 4)),
            ))
            .await,
        );
    }
    app.run_worker_until_idle().await;
    for b in &buys {
        assert_eq!(app.job(*b).await.status, JobStatus::Succeeded);
    }
    fake.set_today(today);
    let (_, listed) = tradier_call(&url, "GET", "/orders?includeTags=true", &[]).await;
    assert_eq!(listed["orders"], json!("null"), "today's list lacks them");
    assert_eq!(fake.open_orders().len(), 2, "both OCOs still work");

    // AAPL: a close alert cancels yesterday's OCO first, then closes.
    let close = app
        .enqueue(&hook(user, &secret, "tradier", "close", "AAPL", 1000, None))
        .await;
    app.run_worker_until_idle().await;
    let row = app.job(close).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    let aapl_sl = client_order_id(buys[0], Leg::StopLoss);
    assert_eq!(fake.orders_tagged(&aapl_sl)[0]["status"], "canceled");
    assert_eq!(row_state(&app, &aapl_sl).await, "cancelled");
    assert_eq!(fake.position("AAPL"), Decimal::ZERO);

    // SPY: sold by hand today; the sweep finds yesterday's OCO orphaned and cancels it.
    hand_sell(&url, "SPY", 2).await;
    let spy_sl = client_order_id(buys[1], Leg::StopLoss);
    let found = reconcile_findings(&app, user).await;
    assert!(
        found.contains(&Finding::OrphanCancelled {
            symbol: "SPY".into(),
            client_order_id: spy_sl.clone(),
        }),
        "{found:?}"
    );
    assert_eq!(fake.orders_tagged(&spy_sl)[0]["status"], "canceled");
    assert!(fake.open_orders().is_empty(), "no orphan left at Tradier");
    assert!(reconcile_findings(&app, user).await.is_empty());
}
