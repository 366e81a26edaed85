//! The Tradier client against its fake.

use std::time::Duration;

use rust_decimal_macros::dec;
use serde_json::json;
use sparky::domain::{Action, ExchangeKind, OrderSide, OrderType, Side, Symbol};
use sparky::exchanges::{client_order_id, ErrorClass, Exchange, Leg, OrderRequest};
use sparky::executor::JobStatus;

use crate::fakes::*;

#[tokio::test]
async fn tradier_order_shape_sides_and_whole_shares() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    // 1000 USD of AAPL at 190 = 5.26 -> 5 shares, opened short with sell_short
    let j = job(
        ExchangeKind::Tradier,
        Action::Sell,
        "NASDAQ:AAPL",
        dec!(1000),
    );
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let post = &fake.core.seen("POST /orders")[0];
    let p = params(&post.body);
    assert_eq!(
        post.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(post.headers["accept"], "application/json");
    assert_eq!(param(&p, "class"), Some("equity"));
    assert_eq!(param(&p, "symbol"), Some("AAPL"));
    assert_eq!(param(&p, "side"), Some("sell_short"));
    assert_eq!(param(&p, "quantity"), Some("5"));
    assert_eq!(param(&p, "type"), Some("market"));
    assert_eq!(param(&p, "duration"), Some("day"));
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(param(&p, "tag"), Some(open_id.as_str()));
    assert_eq!(
        (out.fills[0].quantity, out.fills[0].price),
        (dec!(5), Some(dec!(190)))
    );

    // Reversal: buy_to_cover the 5 short shares, then buy 5
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(1000));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let sides: Vec<_> = fake
        .st
        .lock()
        .unwrap()
        .orders
        .iter()
        .map(|o| o["side"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sides, vec!["sell_short", "buy_to_cover", "buy"]);
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(5));
    // and a close of a long position is a plain sell
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Close, "AAPL", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(fake.st.lock().unwrap().orders[3]["side"], "sell");

    // less than one share never reaches Tradier
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "SPY", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert!(out.message.unwrap().contains("rounds down to 0"));
    let e = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: Symbol::parse("SPY", ExchangeKind::Tradier).unwrap(),
            side: OrderSide::Buy,
            quantity: dec!(0.4),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert!(e.message.contains("less than one share"), "{e}");
    assert_eq!(fake.core.seen("POST /orders").len(), 4);
}

#[tokio::test]
async fn tradier_quirks_null_single_object_and_pending_fill() {
    let (fake, url) = TradierFake::start().await;
    fake.st.lock().unwrap().pending_first = true;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("AAPL", ExchangeKind::Tradier).unwrap();
    // {"positions":"null"}
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    // a single quote object
    assert_eq!(ex.price(&sym).await.unwrap(), dec!(190));
    let e = ex
        .price(&Symbol::parse("NOPE", ExchangeKind::Tradier).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.fills[0].status,
        sparky::job::FillState::Filled,
        "read back until filled"
    );
    // a single position object
    let p = ex.position(&sym).await.unwrap().unwrap();
    assert_eq!(
        (p.side, p.quantity, p.entry_price),
        (Side::Long, dec!(2), Some(dec!(190)))
    );
}

#[tokio::test]
async fn tradier_200_with_errors_is_a_rejection() {
    let (fake, url) = TradierFake::start().await;
    fake.st.lock().unwrap().reject_200 = Some("DayTradingBuyingPowerExceeded".into());
    let ex = tradier_client(&url, Duration::from_secs(5));
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(out
        .message
        .unwrap()
        .contains("DayTradingBuyingPowerExceeded"));
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
}

#[tokio::test]
async fn tradier_unknown_outcome_is_found_by_tag_across_pages() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_millis(700));
    // 30 earlier orders today: the one we look for is on the second page.
    {
        let mut st = fake.st.lock().unwrap();
        for i in 0..30 {
            st.orders.push(json!({"id": i, "tag": format!("other{i}"), "status": "filled", "exec_quantity": 1.0}));
        }
    }
    fake.core.inject(
        "POST /orders",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(fake.orders_tagged(&open_id).len(), 1);
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
    let pages: Vec<_> = fake
        .core
        .seen("GET /orders")
        .iter()
        .map(|s| param(&params(&s.query), "page").unwrap().to_string())
        .collect();
    assert!(pages.contains(&"2".to_string()), "{pages:?}");
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(2));

    // 503 after recording, on a close
    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!("Service Unavailable")),
    );
    let j = job(ExchangeKind::Tradier, Action::Close, "AAPL", dec!(1));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_tagged(&client_order_id(j.job_id, Leg::Close))
            .len(),
        1
    );
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(0));
}

#[tokio::test]
async fn tradier_quota_violation_and_429_are_transient() {
    let (fake, url) = TradierFake::start().await;
    fake.core.inject(
        "POST /orders",
        Fault::Reply(400, json!("Quota Violation"), vec![]),
    );
    fake.core.inject(
        "POST /orders",
        Fault::Reply(
            429,
            json!("Rate limit exceeded"),
            vec![("Retry-After", "1".into())],
        ),
    );
    let ex = tradier_client(&url, Duration::from_secs(5));
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let classes: Vec<_> = out.history.iter().map(|h| h.class.as_str()).collect();
    assert_eq!(classes, vec!["transient", "transient"]);
    assert_eq!(
        fake.orders_tagged(&client_order_id(j.job_id, Leg::Open))
            .len(),
        1
    );
}

#[tokio::test]
async fn tradier_protection_is_one_oco_order() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let mut j = job(ExchangeKind::Tradier, Action::Buy, "SPY", dec!(1000));
    j.alert.stop_loss_percent = Some(dec!(5));
    j.alert.take_profit_percent = Some(dec!(10));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let oco = fake.orders_tagged(&client_order_id(j.job_id, Leg::StopLoss));
    assert_eq!(oco.len(), 1);
    let form: Vec<(String, String)> = oco[0]["form"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv[0].as_str().unwrap().into(),
                kv[1].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(param(&form, "class"), Some("oco"));
    assert_eq!(param(&form, "side[0]"), Some("sell"));
    assert_eq!(param(&form, "price[0]"), Some("550"));
    assert_eq!(param(&form, "stop[1]"), Some("475"));
    assert_eq!(param(&form, "quantity[1]"), Some("2"));
}

// ---------------------------------------------------------------------------------------------
