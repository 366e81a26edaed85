//! The real exchange clients (Aster, OANDA, Tradier) against small fake servers.
//!
//! Each fake is an axum app on 127.0.0.1:0 that checks authentication the way the broker does (for
//! Aster it recomputes the HMAC signature itself and answers -1022 when it does not match), keeps
//! orders and positions, records every request, and can be told to fail the next call of a route:
//! answer an error without doing anything ([`Fault::Reply`]), do the request and then answer an error
//! ([`Fault::AfterDoing`], e.g. a 503 after the order was recorded), or do it and then not answer in
//! time ([`Fault::HangAfterDoing`]).
//!
//! Client-level tests drive a client (or the executor over it) directly; the end-to-end tests go

use std::time::Duration;

use rust_decimal_macros::dec;
use serde_json::json;
use sparky::domain::{CredentialEnv, ExchangeKind, Side};
use sparky::exchanges::{client_order_id, ExPosition, Leg};

use crate::fakes::*;
use crate::helpers::*;
// End to end: webhook -> worker -> fake broker -> Postgres
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn e2e_aster_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, _, app, user, secret) = aster_app().await;

    // buy -> filled and recorded
    let buy = app
        .enqueue(&webhook(
            user,
            &secret,
            "aster",
            "buy",
            "BINANCE:ETHUSDT",
            100,
        ))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(buy).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1);
    assert_eq!(
        (trades[0].quantity, trades[0].price),
        (dec!(0.033), Some(dec!(3000)))
    );
    assert_eq!(trades[0].exchange_order_id.as_deref(), Some("1000"));
    assert_eq!(trades[0].client_order_id, client_order_id(buy, Leg::Open));

    // sell -> reversal: close then open. The close first fails with a 500 (retried; every leg is
    // looked up first), then the open's reply is lost after Aster filled it (503 -1007).
    let route = "POST /fapi/v1/order";
    fake.core.inject(
        route,
        Fault::Reply(500, json!({"code": -1001, "msg": "Internal error"}), vec![]),
    );
    fake.core.inject(route, Fault::Pass);
    fake.core.inject(
        route,
        Fault::AfterDoing(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
        ),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "aster", "sell", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let legs: Vec<_> = app
        .trades(user)
        .await
        .into_iter()
        .filter(|t| t.job_id == sell)
        .map(|t| (t.leg, t.side, t.quantity))
        .collect();
    assert!(
        legs.contains(&("close".into(), "sell".into(), dec!(0.033))),
        "{legs:?}"
    );
    assert!(
        legs.contains(&("open".into(), "sell".into(), dec!(0.033))),
        "{legs:?}"
    );
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Close)), 1);
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Open)), 1);
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(0.033)));

    // close with the reply lost after the order was recorded: found by lookup, one order
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::AfterDoing(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
        ),
    );
    let close = app
        .enqueue(&webhook(user, &secret, "aster", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(
        app.job(close).await.status,
        sparky::job::JobStatus::Succeeded
    );
    assert_eq!(fake.orders_with(&client_order_id(close, Leg::Close)), 1);
    assert!(app.position(user, "ETHUSDT").await.is_none());

    // permanent rejection: the broker's message is the job's error
    fake.st.lock().unwrap().margin_limit = Some(dec!(10));
    let rej = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert_eq!(job.error_class, Some(sparky::job::FailureClass::Permanent));
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("Margin is insufficient."),
        "{job:?}"
    );

    // no secret in the logs
    let logs = captured_logs();
    assert!(!logs.contains(ASTER_SECRET));
    app.cleanup().await;
}

#[tokio::test]
async fn e2e_oanda_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, _url, app, user, secret) = oanda_app().await;

    let buy = app
        .enqueue(&webhook(user, &secret, "oanda", "buy", "EURUSD", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status, sparky::job::JobStatus::Succeeded);
    let t = &app.trades(user).await[0];
    assert_eq!(
        (t.symbol.as_str(), t.quantity, t.price),
        ("EUR_USD", dec!(92), Some(dec!(1.0852)))
    );

    // reversal, with the open's reply lost after OANDA filled it
    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!({"errorMessage": "Service Unavailable"})),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "oanda", "sell", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Open)).len(), 1);
    assert_eq!(
        fake.orders_with(&client_order_id(sell, Leg::Close)).len(),
        1
    );
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    let p = app.position(user, "EUR_USD").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(92)));

    // margin rejection arrives as a 201
    fake.st.lock().unwrap().insufficient_margin = true;
    let close = app
        .enqueue(&webhook(user, &secret, "oanda", "close", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(
        app.job(close).await.status,
        sparky::job::JobStatus::Succeeded,
        "closes go through the positions endpoint"
    );
    let rej = app
        .enqueue(&webhook(user, &secret, "oanda", "buy", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("INSUFFICIENT_MARGIN"),
        "{job:?}"
    );
    assert!(!captured_logs().contains(OANDA_TOKEN));
    app.cleanup().await;
}

#[tokio::test]
async fn e2e_tradier_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, _url, app, user, secret) = tradier_app().await;

    let buy = app
        .enqueue(&webhook(user, &secret, "tradier", "buy", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status, sparky::job::JobStatus::Succeeded);
    let t = &app.trades(user).await[0];
    assert_eq!(
        (t.quantity, t.price, t.side.as_str()),
        (dec!(5), Some(dec!(190)), "buy")
    );

    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!("Service Unavailable")),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "tradier", "sell", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let sides: Vec<_> = fake
        .st
        .lock()
        .unwrap()
        .orders
        .iter()
        .map(|o| o["side"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sides, vec!["buy", "sell", "sell_short"]);
    let p = app.position(user, "AAPL").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(5)));

    fake.st.lock().unwrap().reject_200 = Some("AccountMarginRuleViolation".into());
    let rej = app
        .enqueue(&webhook(user, &secret, "tradier", "close", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("AccountMarginRuleViolation"),
        "{job:?}"
    );
    assert!(!captured_logs().contains(TRADIER_TOKEN));
    app.cleanup().await;
}

#[tokio::test]
async fn factory_hosts_and_missing_fields() {
    let mut c = ctx(Duration::from_secs(1), "x", "x", "x");
    c.aster_base_url = None;
    let mut cr = creds(ExchangeKind::Aster, "k", "s", None, json!({}));
    cr.environment = CredentialEnv::Sandbox;
    let e = sparky::exchanges::build_exchange(&cr, &c).err().unwrap();
    assert!(e.message.contains("testnet"), "{e}");
    cr.environment = CredentialEnv::Production;
    assert!(sparky::exchanges::build_exchange(&cr, &c).is_ok());
    let cr = creds(ExchangeKind::Tradier, "tok", "s", None, json!({}));
    let e = sparky::exchanges::build_exchange(&cr, &c).err().unwrap();
    assert!(e.message.contains("account id"), "{e}");
    let _ = ExPosition {
        side: Side::Long,
        quantity: dec!(1),
        entry_price: None,
    };
}
