//! The OANDA client against its fake.

use std::time::Duration;

use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::{Action, ExchangeKind, OrderSide, OrderType, Symbol};
use sparky::exchanges::oanda::OandaClient;
use sparky::exchanges::{client_order_id, ErrorClass, Exchange, Leg, OrderRequest, OrderState};
use sparky::executor::JobStatus;

use crate::fakes::*;

#[tokio::test]
async fn oanda_market_order_shape_units_and_protection() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    // 100 USD at the mid 1.0851 = 92.157.. -> 92 units (tradeUnitsPrecision 0)
    let mut j = job(ExchangeKind::Oanda, Action::Sell, "OANDA:EURUSD", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(1));
    j.alert.take_profit_percent = Some(dec!(2));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    let orders = fake.orders_with(&open_id);
    assert_eq!(orders.len(), 1);
    let req = &orders[0]["request"];
    assert_eq!(req["type"], "MARKET");
    assert_eq!(req["instrument"], "EUR_USD");
    assert_eq!(req["units"], "-92");
    assert_eq!(req["timeInForce"], "FOK");
    assert_eq!(req["positionFill"], "DEFAULT");
    assert_eq!(req["tradeClientExtensions"]["id"], open_id.as_str());
    assert_eq!(out.fills[0].quantity, dec!(92));
    assert_eq!(out.fills[0].price, Some(dec!(1.085)));
    // Stop-loss / take-profit sent on fill with the order, at 1% / 2% from the reference price
    // (the mid, 1.0851), rounded to the instrument's 5 places; no separate call afterwards.
    assert_eq!(req["stopLossOnFill"]["price"], "1.09595");
    assert_eq!(req["takeProfitOnFill"]["price"], "1.0634");
    assert_eq!(
        req["stopLossOnFill"]["clientExtensions"]["id"],
        client_order_id(j.job_id, Leg::StopLoss).as_str()
    );
    let sl = fake.orders_with(&client_order_id(j.job_id, Leg::StopLoss));
    assert_eq!(sl[0]["price"], "1.09595");
    let tp = fake.orders_with(&client_order_id(j.job_id, Leg::TakeProfit));
    assert_eq!(tp[0]["price"], "1.0634");
    assert!(fake
        .core
        .routes()
        .iter()
        .all(|r| !r.starts_with("PUT /trades")));
    let pos = match &out.position {
        sparky::executor::PositionChange::Open {
            stop_loss_price,
            take_profit_price,
            ..
        } => (*stop_loss_price, *take_profit_price),
        other => panic!("{other:?}"),
    };
    assert_eq!(pos, (Some(dec!(1.09595)), Some(dec!(1.0634))));
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    let seen = &fake.core.seen("POST /orders")[0];
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OANDA_TOKEN}")
    );
    assert!(!format!("{ex:?}").contains(OANDA_TOKEN));
}

#[tokio::test]
async fn oanda_units_are_rounded_to_the_precision_and_minimum_enforced() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let rules = ex
        .symbol_rules(&Symbol::parse("XAU_USD", ExchangeKind::Oanda).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (rules.step, rules.min_qty, rules.tick),
        (dec!(0.01), dec!(0.01), dec!(0.001))
    );
    let ack = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: Symbol::parse("XAU_USD", ExchangeKind::Oanda).unwrap(),
            side: OrderSide::Buy,
            quantity: dec!(0.0567),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "spxau".into(),
        })
        .await
        .unwrap();
    assert_eq!(ack.filled_qty, dec!(0.05));
    assert_eq!(fake.orders_with("spxau")[0]["request"]["units"], "0.05");
    // A reversal to short with 10 USD of gold at ~2000 rounds to 0.00 oz: refused before anything
    // is sent, so the long position is not closed either.
    let out = run(
        &ex,
        &job(ExchangeKind::Oanda, Action::Sell, "XAU_USD", dec!(10)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(out
        .message
        .unwrap()
        .contains("below the minimum quantity 0.01"));
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
    assert!(fake.core.seen("PUT /positions/close").is_empty());
    assert_eq!(fake.st.lock().unwrap().positions["XAU_USD"], dec!(0.05));
}

#[tokio::test]
async fn oanda_201_with_order_cancel_is_a_rejection_not_a_fill() {
    let (fake, url) = OandaFake::start().await;
    fake.st.lock().unwrap().insufficient_margin = true;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let out = run(
        &ex,
        &job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("INSUFFICIENT_MARGIN"),
        "{out:?}"
    );
    assert!(out.fills.is_empty());
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
}

#[tokio::test]
async fn oanda_reversal_closes_through_the_positions_endpoint_then_opens() {
    let (fake, url) = OandaFake::start().await;
    fake.st
        .lock()
        .unwrap()
        .positions
        .insert("EUR_USD".into(), dec!(500));
    let ex = oanda_client(&url, Duration::from_secs(5));
    let j = job(ExchangeKind::Oanda, Action::Sell, "EUR_USD", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let routes: Vec<_> = fake
        .core
        .routes()
        .into_iter()
        .filter(|r| r.starts_with("PUT") || r.starts_with("POST"))
        .collect();
    assert_eq!(routes, vec!["PUT /positions/close", "POST /orders"]);
    let close = &fake.core.seen("PUT /positions/close")[0];
    let b: Value = serde_json::from_str(&close.body).unwrap();
    assert_eq!(b["longUnits"], "ALL");
    assert_eq!(
        b["longClientExtensions"]["id"],
        client_order_id(j.job_id, Leg::Close)
    );
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    assert_eq!(out.fills[0].quantity, dec!(500));
}

#[tokio::test]
async fn oanda_timeout_and_503_after_recording_leave_one_order() {
    let (fake, url) = OandaFake::start().await;
    fake.core.inject(
        "POST /orders",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let ex = oanda_client(&url, Duration::from_millis(700));
    let j = job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_with(&client_order_id(j.job_id, Leg::Open))
            .len(),
        1
    );
    assert_eq!(out.fills[0].quantity, dec!(92));
    assert_eq!(out.fills[0].price, Some(dec!(1.0852)));

    fake.core.inject(
        "PUT /positions/close",
        Fault::AfterDoing(503, json!({"errorMessage": "Service Unavailable"})),
    );
    let j = job(ExchangeKind::Oanda, Action::Close, "EUR_USD", dec!(1));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_with(&client_order_id(j.job_id, Leg::Close))
            .len(),
        1
    );
    assert_eq!(fake.core.seen("PUT /positions/close").len(), 1);
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(0));

    // a retried open whose first send got through: OANDA refuses the id, the client finds the order
    let order = OrderRequest {
        on_fill: None,
        symbol: Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap(),
        side: OrderSide::Buy,
        quantity: dec!(10),
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: "sprepeat".into(),
    };
    let a = ex.place_order(&order).await.unwrap();
    let b = ex.place_order(&order).await.unwrap();
    assert_eq!(a.exchange_order_id, b.exchange_order_id);
    assert_eq!(b.state, OrderState::Filled);
    assert_eq!(b.filled_qty, dec!(10));
    assert_eq!(fake.orders_with("sprepeat").len(), 1);
}

#[tokio::test]
async fn oanda_auth_and_rate_limit_errors_are_classified() {
    let (fake, url) = OandaFake::start().await;
    let c = creds(
        ExchangeKind::Oanda,
        "wrong",
        "unused",
        Some(OANDA_ACCOUNT),
        json!({}),
    );
    let bad = OandaClient::new(&c, &ctx(Duration::from_secs(5), "x", &url, "x")).unwrap();
    let sym = Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap();
    let e = bad.price(&sym).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(e.message.contains("Insufficient authorization"), "{e}");

    fake.core.inject(
        "GET /pricing",
        Fault::Reply(
            429,
            json!("Too Many Requests"),
            vec![("Retry-After", "2".into())],
        ),
    );
    let ex = oanda_client(&url, Duration::from_secs(5));
    let e = ex.price(&sym).await.unwrap_err();
    assert_eq!(
        (e.class, e.retry_after),
        (ErrorClass::Transient, Some(Duration::from_secs(2)))
    );
    assert_eq!(ex.price(&sym).await.unwrap(), dec!(1.0851));

    let c = creds(ExchangeKind::Oanda, OANDA_TOKEN, "x", None, json!({}));
    let e = OandaClient::new(&c, &ctx(Duration::from_secs(1), "x", &url, "x")).unwrap_err();
    assert!(e.message.contains("account id"), "{e}");
}
