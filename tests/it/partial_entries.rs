//! Issue 12: working entries that fill in part (followed to their expiry, or cancelled by a later
//! alert), and the fees brokers report on fills (`trades.fee`).

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::Side;
use sparky::exchanges::{client_order_id, Leg};
use sparky::job::JobStatus;
use sparky::reconcile::{Finding, Held};
use uuid::Uuid;

use crate::fakes::*;
use crate::helpers::*;

fn limit_buy(
    user: Uuid,
    secret: &str,
    exchange: &str,
    symbol: &str,
    usd: u32,
    price: Decimal,
) -> Value {
    let mut h = webhook(user, secret, exchange, "buy", symbol, usd);
    h["order_type"] = json!("limit");
    h["price"] = json!(price);
    h["limit_ttl_secs"] = json!(600);
    h["stop_loss_percent"] = json!(2);
    h["take_profit_percent"] = json!(4);
    h
}

fn long(q: Decimal) -> Option<Held> {
    Some(Held {
        side: Side::Long,
        quantity: q,
    })
}

/// A Tradier limit entry for 10 shares fills 4 while it works: the sweep takes the 4 as the
/// entry's (not drift). When its time is up the follower cancels the rest and records the 4 as
/// the job's open trade and position, protected for 4 shares; the job succeeds, saying so.
#[tokio::test]
async fn tradier_entry_partly_filled_before_expiry_records_and_protects_what_filled() {
    let (fake, _, app, user, secret) = tradier_app().await;
    let entry = app
        .run_expecting(
            &limit_buy(user, &secret, "tradier", "AAPL", 2000, dec!(185)),
            JobStatus::Working,
        )
        .await;
    let open_id = client_order_id(entry, Leg::Open);
    fake.fill_part(&open_id, dec!(4));
    assert_eq!(fake.position("AAPL"), dec!(4));

    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::PositionSynced {
            symbol: "AAPL".into(),
            sparky: None,
            broker: long(dec!(4)),
            drift: None,
        }],
        "the working entry's part explains the position"
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Working);

    expire_working_entries_now(&app, entry).await;
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryFilled {
            symbol: "AAPL".into(),
            job_id: entry,
            quantity: dec!(4),
            price: Some(dec!(185)),
            status: JobStatus::Succeeded,
        }]
    );
    let job = app.job(entry).await;
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(
        job.error
            .as_deref()
            .is_some_and(|m| m.contains("partially filled: 4 AAPL")),
        "{job:?}"
    );
    let order = &fake.orders_tagged(&open_id)[0];
    assert_eq!(order["status"], "canceled", "the rest was cancelled");
    assert_eq!(order["exec_quantity"].as_f64(), Some(4.0));
    let (qty, price, _, _, fee) = trade_leg(&app, entry, "open").await;
    assert_eq!((qty, price, fee), (dec!(4), Some(dec!(185)), None));
    let oco = fake.orders_tagged(&client_order_id(entry, Leg::StopLoss));
    assert_eq!(oco.len(), 1);
    assert_eq!(oco[0]["status"], "open");
    for l in oco[0]["leg"].as_array().unwrap() {
        assert_eq!(l["quantity"].as_f64(), Some(4.0), "protects what filled");
    }
    let pos = app.position(user, "AAPL").await.unwrap();
    assert_eq!(
        (
            pos.side,
            pos.quantity,
            pos.stop_loss_price,
            pos.take_profit_price
        ),
        (Side::Long, dec!(4), Some(dec!(181.3)), Some(dec!(192.4)))
    );
    assert!(reconcile_findings(&app, user).await.is_empty(), "in line");
}

/// The same on Aster (its cancel leaves the order `CANCELED` with its `executedQty`), with the
/// fill's commission read from `userTrades` as the trade's fee.
#[tokio::test]
async fn aster_entry_partly_filled_before_expiry_records_and_protects_what_filled() {
    let (fake, _url, app, user, secret) = aster_app().await;
    let entry = app
        .run_expecting(
            &limit_buy(user, &secret, "aster", "ETHUSDT", 100, dec!(2900)),
            JobStatus::Working,
        )
        .await;
    let open_id = client_order_id(entry, Leg::Open);
    fake.fill_part(&open_id, dec!(0.014));
    expire_working_entries_now(&app, entry).await;
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryFilled {
            symbol: "ETHUSDT".into(),
            job_id: entry,
            quantity: dec!(0.014),
            price: Some(dec!(2900)),
            status: JobStatus::Succeeded,
        }]
    );
    let order = fake.order(&open_id).unwrap();
    assert_eq!(
        (order["status"].as_str(), order["executedQty"].as_str()),
        (Some("CANCELED"), Some("0.014"))
    );
    // 0.014 x 2900 x 0.0004
    assert_eq!(
        trade_leg(&app, entry, "open").await,
        (
            dec!(0.014),
            Some(dec!(2900)),
            None,
            None,
            Some(dec!(0.01624))
        )
    );
    assert_eq!(
        fake.open_orders("ETHUSDT").len(),
        2,
        "stop-loss and take-profit"
    );
    let pos = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((pos.side, pos.quantity), (Side::Long, dec!(0.014)));
    assert_eq!(fake.position("ETHUSDT"), dec!(0.014));
    assert!(reconcile_findings(&app, user).await.is_empty(), "in line");
}

/// A later alert cancels a working entry that had filled in part: the part is recorded as the
/// entry's open trade and as the position, and the later `sell` reverses that position as usual
/// (its close carries the PnL from the entry's price). The sweep then ends the entry's job
/// `succeeded`; nothing is drift.
#[tokio::test]
async fn a_later_alert_takes_over_a_partly_filled_entry_and_reverses_it() {
    let (fake, _url, app, user, secret) = aster_app().await;
    let entry = app
        .enqueue(&limit_buy(
            user,
            &secret,
            "aster",
            "ETHUSDT",
            100,
            dec!(2900),
        ))
        .await;
    app.run_worker_until_idle().await;
    fake.fill_part(&client_order_id(entry, Leg::Open), dec!(0.014));
    let sell = app
        .enqueue(&webhook(user, &secret, "aster", "sell", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let row = app.job(sell).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");

    let (qty, price, pnl, _, _) = trade_leg(&app, entry, "open").await;
    assert_eq!((qty, price, pnl), (dec!(0.014), Some(dec!(2900)), None));
    let (qty, price, pnl, _, fee) = trade_leg(&app, sell, "close").await;
    assert_eq!(
        (qty, price, pnl, fee),
        (
            dec!(0.014),
            Some(dec!(3000)),
            Some(dec!(1.4)),
            Some(dec!(0.0168))
        )
    );
    let (qty, ..) = trade_leg(&app, sell, "open").await;
    assert_eq!(qty, dec!(0.033));
    assert_eq!(fake.position("ETHUSDT"), dec!(-0.033));
    let pos = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((pos.side, pos.quantity), (Side::Short, dec!(0.033)));
    assert_eq!(app.job(entry).await.status, JobStatus::Working);

    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryPartlyFilledBeforeLaterAlert {
            job_id: entry,
            quantity: dec!(0.014)
        }]
    );
    let job = app.job(entry).await;
    assert_eq!(job.status, JobStatus::Succeeded);
    assert!(
        job.error.as_deref().is_some_and(|m| m.contains("0.014")),
        "{job:?}"
    );
    assert!(reconcile_findings(&app, user).await.is_empty());
}

/// On Tradier, a later `buy` finds the partly filled entry's shares as its position: it records
/// them (the entry's trade, Sparky's position) and is skipped as "already long", saying whose
/// shares they are.
#[tokio::test]
async fn a_later_same_side_alert_records_a_partly_filled_entry_and_skips() {
    let (fake, _, app, user, secret) = tradier_app().await;
    let entry = app
        .enqueue(&limit_buy(
            user,
            &secret,
            "tradier",
            "AAPL",
            2000,
            dec!(185),
        ))
        .await;
    app.run_worker_until_idle().await;
    let open_id = client_order_id(entry, Leg::Open);
    fake.fill_part(&open_id, dec!(4));
    let buy = app
        .enqueue(&webhook(user, &secret, "tradier", "buy", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    let row = app.job(buy).await;
    assert_eq!(row.status, JobStatus::Skipped, "{row:?}");
    let m = row.error.clone().unwrap_or_default();
    assert!(m.contains("already long 4"), "{m}");
    assert!(m.contains(&entry.to_string()), "{m}");
    assert_eq!(fake.orders_tagged(&open_id)[0]["status"], "canceled");
    let (qty, price, ..) = trade_leg(&app, entry, "open").await;
    assert_eq!((qty, price), (dec!(4), Some(dec!(185))));
    let pos = app.position(user, "AAPL").await.unwrap();
    assert_eq!((pos.side, pos.quantity), (Side::Long, dec!(4)));
    assert_eq!(
        reconcile_findings(&app, user).await,
        [Finding::EntryPartlyFilledBeforeLaterAlert {
            job_id: entry,
            quantity: dec!(4)
        }]
    );
    assert_eq!(app.job(entry).await.status, JobStatus::Succeeded);
}

/// OANDA reports `commission` and `financing` on each fill: the fee is commission minus
/// financing (financing is negative when paid), on the open and on the close.
#[tokio::test]
async fn oanda_fill_commission_and_financing_are_the_trades_fee() {
    let (fake, _, app, user, secret) = oanda_app().await;
    {
        let mut st = fake.st.lock().unwrap();
        st.commission = dec!(0.25);
        st.close_financing = dec!(-0.1);
    }
    let buy = app
        .enqueue(&webhook(user, &secret, "oanda", "buy", "EUR_USD", 100))
        .await;
    let close = app
        .run_expecting(
            &webhook(user, &secret, "oanda", "close", "EUR_USD", 100),
            JobStatus::Succeeded,
        )
        .await;
    assert_eq!(trade_leg(&app, buy, "open").await.4, Some(dec!(0.25)));
    assert_eq!(trade_leg(&app, close, "close").await.4, Some(dec!(0.35)));
}

/// Aster's commissions come from `userTrades` (matched on the order id): on the open, the close,
/// and a stop-loss the sweep records.
#[tokio::test]
async fn aster_commissions_are_the_trades_fee() {
    let (fake, _url, app, user, secret) = aster_app().await;
    let mut hook = webhook(user, &secret, "aster", "buy", "ETHUSDT", 100);
    hook["stop_loss_percent"] = json!(2);
    let buy = app.enqueue(&hook).await;
    app.run_worker_until_idle().await;
    // 0.033 x 3000 x 0.0004
    assert_eq!(trade_leg(&app, buy, "open").await.4, Some(dec!(0.0396)));
    fake.set_price("ETHUSDT", dec!(2900));
    reconcile_findings(&app, user).await;
    // 0.033 x 2900 x 0.0004
    assert_eq!(trade_leg(&app, buy, "sl").await.4, Some(dec!(0.03828)));
    assert!(!fake.core.seen("GET /fapi/v1/userTrades").is_empty());

    let again = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    let close = app
        .enqueue(&webhook(user, &secret, "aster", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(again).await.status, JobStatus::Succeeded);
    // 0.034 x 2900 x 0.0004
    assert_eq!(trade_leg(&app, close, "close").await.4, Some(dec!(0.03944)));
}
