//! The Aster client against its fake.

use std::time::{Duration, Instant};

use rust_decimal_macros::dec;
use serde_json::json;
use sparky::domain::{Action, ExchangeKind, OrderSide, OrderType, Symbol};
use sparky::exchanges::aster::AsterClient;
use sparky::exchanges::{client_order_id, ErrorClass, Exchange, Leg, OrderRequest, OrderState};
use sparky::executor::JobStatus;

use crate::fakes::*;

fn order_params(s: &Seen) -> Vec<(String, String)> {
    params(&s.body)
}

#[tokio::test]
async fn aster_signs_every_private_call_and_a_bad_secret_is_refused_with_1022() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    let seen = fake.core.seen("GET /fapi/v2/positionRisk");
    let q = params(&seen[0].query);
    assert_eq!(
        q.last().unwrap().0,
        "signature",
        "signature is the last parameter"
    );
    assert!(param(&q, "timestamp").is_some() && param(&q, "recvWindow") == Some("5000"));
    assert_eq!(seen[0].headers["X-MBX-APIKEY"], ASTER_KEY);

    let bad = creds(
        ExchangeKind::Aster,
        ASTER_KEY,
        "not-the-secret",
        None,
        json!({}),
    );
    let bad = AsterClient::new(&bad, &ctx(Duration::from_secs(5), &url, "x", "x")).unwrap();
    let e = bad.position(&sym).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("-1022") && e.message.contains("Signature"),
        "{e}"
    );
    assert!(!e.message.contains("not-the-secret"));
    let dbg = format!("{bad:?}");
    assert!(
        !dbg.contains("not-the-secret") && !dbg.contains(ASTER_KEY),
        "{dbg}"
    );
}

#[tokio::test]
async fn aster_market_buy_is_sized_to_the_market_lot_step_and_recorded() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    // 100 USD of ETH at 3000 = 0.0333.. -> 0.033
    let j = job(
        ExchangeKind::Aster,
        Action::Buy,
        "BINANCE:ETHUSDT",
        dec!(100),
    );
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let post = &fake.core.seen("POST /fapi/v1/order")[0];
    let p = order_params(post);
    assert!(post.query.is_empty(), "parameters go in the body only");
    assert_eq!(param(&p, "symbol"), Some("ETHUSDT"));
    assert_eq!(param(&p, "side"), Some("BUY"));
    assert_eq!(param(&p, "type"), Some("MARKET"));
    assert_eq!(param(&p, "quantity"), Some("0.033"));
    assert_eq!(param(&p, "reduceOnly"), None);
    assert_eq!(param(&p, "newOrderRespType"), Some("RESULT"));
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(param(&p, "newClientOrderId"), Some(open_id.as_str()));
    assert_eq!(p.last().unwrap().0, "signature");
    assert_eq!(out.fills[0].quantity, dec!(0.033));
    assert_eq!(out.fills[0].price, Some(dec!(3000)));
    assert_eq!(out.fills[0].status, sparky::job::FillState::Filled);

    // SOLUSDT: LOT_SIZE step 0.01 but MARKET_LOT_SIZE step 0.1: 100/150 = 0.666 -> 0.6
    let j = job(ExchangeKind::Aster, Action::Sell, "SOLUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let p = order_params(&fake.core.seen("POST /fapi/v1/order")[1]);
    assert_eq!(param(&p, "quantity"), Some("0.6"));
    assert_eq!(param(&p, "side"), Some("SELL"));
    // exchangeInfo was fetched once and cached for both symbols.
    assert_eq!(fake.core.seen("GET /fapi/v1/exchangeInfo").len(), 1);
}

#[tokio::test]
async fn aster_too_small_orders_never_reach_the_exchange() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    // 4 USD -> 0.001 ETH = 3 USD notional, below MIN_NOTIONAL 5
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(4)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("below the minimum 5"),
        "{out:?}"
    );
    // and straight at the client: 0.0019 rounds down to 0.001 -> 3 USD
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    let e = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: sym.clone(),
            side: OrderSide::Buy,
            quantity: dec!(0.0019),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("0.001") && e.message.contains("notional"),
        "{e}"
    );
    assert!(fake.core.seen("POST /fapi/v1/order").is_empty());

    // A limit price is rounded to the tick before it is sent.
    let ack = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: sym,
            side: OrderSide::Buy,
            quantity: dec!(0.01),
            order_type: OrderType::Limit,
            limit_price: Some(dec!(2999.996)),
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x2".into(),
        })
        .await
        .unwrap();
    assert_eq!(ack.state, OrderState::Accepted);
    let p = order_params(&fake.core.seen("POST /fapi/v1/order")[0]);
    assert_eq!(param(&p, "price"), Some("3000"));
    assert_eq!(param(&p, "timeInForce"), Some("GTC"));
}

#[tokio::test]
async fn aster_reversal_closes_reduce_only_then_opens() {
    let (fake, url) = AsterFake::start().await;
    fake.st
        .lock()
        .unwrap()
        .positions
        .insert("ETHUSDT".into(), dec!(-0.05));
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let posts = fake.core.seen("POST /fapi/v1/order");
    assert_eq!(posts.len(), 2);
    let close = order_params(&posts[0]);
    assert_eq!(param(&close, "reduceOnly"), Some("true"));
    assert_eq!(param(&close, "side"), Some("BUY"));
    assert_eq!(param(&close, "quantity"), Some("0.05"));
    assert_eq!(
        param(&close, "newClientOrderId"),
        Some(client_order_id(j.job_id, Leg::Close).as_str())
    );
    let open = order_params(&posts[1]);
    assert_eq!(param(&open, "reduceOnly"), None);
    assert_eq!(param(&open, "quantity"), Some("0.033"));
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(0.033));
    let legs: Vec<_> = out.fills.iter().map(|f| f.leg).collect();
    assert_eq!(legs, vec![Leg::Close, Leg::Open]);

    // close: no position -> skipped; with one -> a reduce-only market order
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(0));
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Skipped, "{out:?}");
}

#[tokio::test]
async fn aster_rate_limits_and_5xx_are_retried_honouring_retry_after() {
    let (fake, url) = AsterFake::start().await;
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            429,
            json!({"code": -1003, "msg": "Too many requests."}),
            vec![("Retry-After", "1".into())],
        ),
    );
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            500,
            json!({"code": -1001, "msg": "Internal error."}),
            vec![],
        ),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let started = Instant::now();
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let classes: Vec<_> = out.history.iter().map(|h| h.class.as_str()).collect();
    assert_eq!(classes, vec!["transient", "transient"]);
    // Every retry carried the same client order id, and exactly one order exists.
    let open_id = client_order_id(j.job_id, Leg::Open);
    for s in fake.core.seen("POST /fapi/v1/order") {
        assert_eq!(
            param(&order_params(&s), "newClientOrderId"),
            Some(open_id.as_str())
        );
    }
    assert_eq!(fake.orders_with(&open_id), 1);
}

#[tokio::test]
async fn aster_503_after_the_order_was_recorded_is_resolved_by_lookup() {
    let (fake, url) = AsterFake::start().await;
    // Aster would accept a blind resend of a filled order's id: only the look-up prevents a double.
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::AfterDoing(503, json!({"code": -1007, "msg": "Timeout waiting for response from backend server. Send status unknown; execution status unknown."})),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(fake.orders_with(&open_id), 1);
    assert_eq!(fake.core.seen("POST /fapi/v1/order").len(), 1);
    let lookups = fake.core.seen("GET /fapi/v1/order");
    assert!(!lookups.is_empty());
    assert_eq!(
        param(&params(&lookups[0].query), "origClientOrderId"),
        Some(open_id.as_str())
    );
    assert_eq!(out.fills[0].exchange_order_id.as_deref(), Some("1000"));
}

#[tokio::test]
async fn aster_timeout_after_the_order_was_recorded_leaves_exactly_one_order() {
    let (fake, url) = AsterFake::start().await;
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let ex = aster_client(&url, Duration::from_millis(700), json!({}));
    let j = job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.history.len(),
        0,
        "resolved by the look-up within the attempt"
    );
    assert_eq!(fake.orders_with(&client_order_id(j.job_id, Leg::Open)), 1);
    assert_eq!(fake.orders().len(), 1);
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(-0.033));
}

#[tokio::test]
async fn aster_unknown_outcome_with_no_order_resends_the_same_id_once() {
    let (fake, url) = AsterFake::start().await;
    // 503 without recording anything: the look-up says -2013, so the leg is sent again.
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
            vec![],
        ),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    let posts = fake.core.seen("POST /fapi/v1/order");
    assert_eq!(posts.len(), 2);
    for s in &posts {
        assert_eq!(
            param(&order_params(s), "newClientOrderId"),
            Some(open_id.as_str())
        );
    }
    assert_eq!(fake.orders_with(&open_id), 1);
}

#[tokio::test]
async fn aster_duplicate_id_4116_means_already_placed() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().reject_duplicates = true;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let order = OrderRequest {
        on_fill: None,
        symbol: Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap(),
        side: OrderSide::Buy,
        quantity: dec!(0.01),
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: "spdup".into(),
    };
    let first = ex.place_order(&order).await.unwrap();
    let again = ex.place_order(&order).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(again.state, OrderState::Filled);
    assert_eq!(fake.orders_with("spdup"), 1);
}

#[tokio::test]
async fn aster_margin_rejection_is_permanent_with_the_brokers_message() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().margin_limit = Some(dec!(50));
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert_eq!(out.error_class, Some(sparky::job::FailureClass::Permanent));
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("Margin is insufficient. (code -2019)"),
        "{out:?}"
    );
    assert_eq!(
        fake.core.seen("POST /fapi/v1/order").len(),
        1,
        "not retried"
    );
}

#[tokio::test]
async fn aster_clock_drift_is_corrected_after_1021() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().clock_skew_ms = 20_000;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    assert_eq!(fake.core.seen("GET /fapi/v1/time").len(), 1);
    // The offset is kept: the next call is accepted at once.
    ex.position(&sym).await.unwrap();
    assert_eq!(fake.core.seen("GET /fapi/v2/positionRisk").len(), 3);
}

#[tokio::test]
async fn aster_leverage_and_protective_orders() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({"leverage": 5}));
    let mut j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(2));
    j.alert.take_profit_percent = Some(dec!(4));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.st.lock().unwrap().leverage,
        vec![("ETHUSDT".to_string(), "5".to_string())]
    );
    let routes = fake.core.routes();
    let lev = routes
        .iter()
        .position(|r| r == "POST /fapi/v1/leverage")
        .unwrap();
    let ord = routes
        .iter()
        .position(|r| r == "POST /fapi/v1/order")
        .unwrap();
    assert!(lev < ord, "leverage is set before the order");
    let orders = fake.orders();
    assert_eq!(orders.len(), 3);
    let sl = &orders[1];
    assert_eq!(sl["type"], "STOP_MARKET");
    assert_eq!(sl["stopPrice"], "2940");
    assert_eq!(sl["side"], "SELL");
    assert_eq!(
        sl["clientOrderId"],
        client_order_id(j.job_id, Leg::StopLoss)
    );
    let tp = &orders[2];
    assert_eq!(tp["type"], "TAKE_PROFIT_MARKET");
    assert_eq!(tp["stopPrice"], "3120");
    assert_eq!(
        tp["clientOrderId"],
        client_order_id(j.job_id, Leg::TakeProfit)
    );

    let bad = creds(
        ExchangeKind::Aster,
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({"leverage": 500}),
    );
    let e = AsterClient::new(&bad, &ctx(Duration::from_secs(1), &url, "x", "x")).unwrap_err();
    assert!(e.message.contains("1 to 125"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// The fake's broker behaviour for issue 12: open orders, cancel, stops that fire, partial fills
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn aster_fake_closeposition_stop_fires_on_a_price_move_and_the_other_leg_stays_open() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let mut j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(2));
    j.alert.take_profit_percent = Some(dec!(4));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let sl_id = client_order_id(j.job_id, Leg::StopLoss);
    let tp_id = client_order_id(j.job_id, Leg::TakeProfit);

    // Both protective orders are listed as open, over HTTP and by the helper.
    let (s, open) = aster_call(&url, "GET", "/fapi/v1/openOrders", &[("symbol", "ETHUSDT")]).await;
    assert_eq!(s, 200, "{open}");
    let ids: Vec<&str> = open
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["clientOrderId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![sl_id.as_str(), tp_id.as_str()]);
    assert_eq!(open[0]["closePosition"], true);
    assert_eq!(fake.open_orders("ETHUSDT").len(), 2);

    // Not crossed: nothing happens.
    fake.set_price("ETHUSDT", dec!(2950));
    assert_eq!(fake.position("ETHUSDT"), dec!(0.033));
    // Crossed: the stop closes the whole position at the new price.
    fake.set_price("ETHUSDT", dec!(2930));
    assert_eq!(fake.position("ETHUSDT"), dec!(0));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    let sl = ex.find_order(&sym, &sl_id).await.unwrap().unwrap();
    assert_eq!(sl.state, OrderState::Filled);
    assert_eq!(
        (sl.filled_qty, sl.avg_price),
        (dec!(0.033), Some(dec!(2930)))
    );
    // The exit is visible as an execution with its realized PnL (0.033 x -70).
    let (_, trades) =
        aster_call(&url, "GET", "/fapi/v1/userTrades", &[("symbol", "ETHUSDT")]).await;
    let exit = trades.as_array().unwrap().last().unwrap().clone();
    assert_eq!(exit["orderId"], fake.order(&sl_id).unwrap()["orderId"]);
    assert_eq!(
        (exit["side"].as_str(), exit["qty"].as_str()),
        (Some("SELL"), Some("0.033"))
    );
    assert_eq!(exit["realizedPnl"], "-2.31");
    assert_eq!(fake.user_trades("ETHUSDT").len(), 2);

    // The take-profit was not cancelled by Aster: it is an orphan until someone cancels it.
    let open = fake.open_orders("ETHUSDT");
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["clientOrderId"], tp_id.as_str());
    let (s, one) = aster_call(
        &url,
        "GET",
        "/fapi/v1/openOrder",
        &[("symbol", "ETHUSDT"), ("origClientOrderId", &sl_id)],
    )
    .await;
    assert_eq!(
        (s, one["code"].as_i64()),
        (400, Some(-2013)),
        "a filled order is not open"
    );
    let (s, c) = aster_call(
        &url,
        "DELETE",
        "/fapi/v1/order",
        &[("symbol", "ETHUSDT"), ("origClientOrderId", &tp_id)],
    )
    .await;
    assert_eq!((s, c["status"].as_str()), (200, Some("CANCELED")), "{c}");
    // Cancelling a final order (cancelled or filled) is refused with -2011.
    for id in [&tp_id, &sl_id] {
        let (s, c) = aster_call(
            &url,
            "DELETE",
            "/fapi/v1/order",
            &[("symbol", "ETHUSDT"), ("origClientOrderId", id)],
        )
        .await;
        assert_eq!((s, c["code"].as_i64()), (400, Some(-2011)), "{c}");
    }
    assert!(fake.open_orders("ETHUSDT").is_empty());
    let (_, all) = aster_call(&url, "GET", "/fapi/v1/allOrders", &[("symbol", "ETHUSDT")]).await;
    let states: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["FILLED", "FILLED", "CANCELED"]);
}

#[tokio::test]
async fn aster_fake_leftover_closeposition_stop_closes_the_next_position_and_cancel_by_order_id() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let mut j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    j.alert.take_profit_percent = Some(dec!(4));
    assert_eq!(run(&ex, &j).await.status, JobStatus::Succeeded);
    // Closed by hand (not by Sparky, which would cancel it); the take-profit (3120) stays.
    let (s, c) = aster_call(
        &url,
        "POST",
        "/fapi/v1/order",
        &[
            ("symbol", "ETHUSDT"),
            ("side", "SELL"),
            ("type", "MARKET"),
            ("quantity", "0.033"),
            ("reduceOnly", "true"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(fake.position("ETHUSDT"), dec!(0));
    assert_eq!(fake.open_orders("ETHUSDT").len(), 1);
    // A new long; the old take-profit closes it when the price reaches 3120.
    let j2 = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(200));
    assert_eq!(run(&ex, &j2).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("ETHUSDT"), dec!(0.066));
    fake.set_price("ETHUSDT", dec!(3125));
    assert_eq!(fake.position("ETHUSDT"), dec!(0));
    let tp = fake
        .order(&client_order_id(j.job_id, Leg::TakeProfit))
        .unwrap();
    assert_eq!(
        (tp["status"].as_str(), tp["executedQty"].as_str()),
        (Some("FILLED"), Some("0.066"))
    );

    // A quantity + reduceOnly stop closes at most its quantity; cancel by orderId; cancel-all.
    fake.set_price("ETHUSDT", dec!(3000));
    let j3 = job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(300));
    assert_eq!(run(&ex, &j3).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("ETHUSDT"), dec!(-0.1));
    for (coid, stop) in [("q1", "3200"), ("q2", "3300"), ("q3", "3400")] {
        let (s, o) = aster_call(
            &url,
            "POST",
            "/fapi/v1/order",
            &[
                ("symbol", "ETHUSDT"),
                ("side", "BUY"),
                ("type", "STOP_MARKET"),
                ("stopPrice", stop),
                ("quantity", "0.04"),
                ("reduceOnly", "true"),
                ("newClientOrderId", coid),
            ],
        )
        .await;
        assert_eq!((s, o["status"].as_str()), (200, Some("NEW")), "{o}");
    }
    fake.set_price("ETHUSDT", dec!(3210));
    assert_eq!(fake.position("ETHUSDT"), dec!(-0.06));
    let q2 = fake.order("q2").unwrap();
    let (s, c) = aster_call(
        &url,
        "DELETE",
        "/fapi/v1/order",
        &[
            ("symbol", "ETHUSDT"),
            ("orderId", &q2["orderId"].to_string()),
        ],
    )
    .await;
    assert_eq!(
        (s, c["clientOrderId"].as_str(), c["status"].as_str()),
        (200, Some("q2"), Some("CANCELED"))
    );
    let (s, c) = aster_call(
        &url,
        "DELETE",
        "/fapi/v1/allOpenOrders",
        &[("symbol", "ETHUSDT")],
    )
    .await;
    assert_eq!((s, c["code"].as_str()), (200, Some("200")));
    assert!(fake.open_orders("ETHUSDT").is_empty());
    fake.set_price("ETHUSDT", dec!(3500));
    assert_eq!(
        fake.position("ETHUSDT"),
        dec!(-0.06),
        "cancelled stops never fire"
    );
}

#[tokio::test]
async fn aster_fake_partial_market_fill_ends_expired_and_a_limit_rests_until_crossed() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    fake.partial_next(dec!(0.5));
    let req = |coid: &str, side, qty, order_type, limit_price, reduce_only| OrderRequest {
        on_fill: None,
        symbol: sym.clone(),
        side,
        quantity: qty,
        order_type,
        limit_price,
        reduce_only,
        leg: Leg::Open,
        client_order_id: coid.into(),
    };
    ex.place_order(&req(
        "m1",
        OrderSide::Buy,
        dec!(0.035),
        OrderType::Market,
        None,
        false,
    ))
    .await
    .unwrap();
    let m1 = fake.order("m1").unwrap();
    assert_eq!(
        (
            m1["status"].as_str(),
            m1["origQty"].as_str(),
            m1["executedQty"].as_str()
        ),
        (Some("EXPIRED"), Some("0.035"), Some("0.017"))
    );
    assert_eq!(fake.position("ETHUSDT"), dec!(0.017));
    // A partial close by quantity.
    fake.partial_next_qty(dec!(0.01));
    ex.place_order(&req(
        "m2",
        OrderSide::Sell,
        dec!(0.017),
        OrderType::Market,
        None,
        true,
    ))
    .await
    .unwrap();
    assert_eq!(fake.order("m2").unwrap()["status"], "EXPIRED");
    assert_eq!(fake.position("ETHUSDT"), dec!(0.007));
    // The next one fills in full again.
    ex.place_order(&req(
        "m3",
        OrderSide::Sell,
        dec!(0.007),
        OrderType::Market,
        None,
        true,
    ))
    .await
    .unwrap();
    assert_eq!(fake.order("m3").unwrap()["status"], "FILLED");
    assert_eq!(fake.position("ETHUSDT"), dec!(0));

    // A limit below the market rests (NEW) and fills at its limit when the price comes down.
    let ack = ex
        .place_order(&req(
            "l1",
            OrderSide::Buy,
            dec!(0.01),
            OrderType::Limit,
            Some(dec!(2900)),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(ack.state, OrderState::Accepted);
    assert_eq!(fake.open_orders("ETHUSDT").len(), 1);
    fake.set_price("ETHUSDT", dec!(2950));
    assert_eq!(fake.order("l1").unwrap()["status"], "NEW");
    fake.set_price("ETHUSDT", dec!(2890));
    let l1 = ex.find_order(&sym, "l1").await.unwrap().unwrap();
    assert_eq!(
        (l1.state, l1.filled_qty, l1.avg_price),
        (OrderState::Filled, dec!(0.01), Some(dec!(2900)))
    );
    assert_eq!(fake.position("ETHUSDT"), dec!(0.01));
    assert!(fake.open_orders("ETHUSDT").is_empty());
    // A marketable limit fills at once.
    let ack = ex
        .place_order(&req(
            "l2",
            OrderSide::Sell,
            dec!(0.01),
            OrderType::Limit,
            Some(dec!(2800)),
            true,
        ))
        .await
        .unwrap();
    assert_eq!(ack.state, OrderState::Filled);
    assert_eq!(fake.position("ETHUSDT"), dec!(0));

    // By rule: every second reduce-only market order fills a third.
    let mut n = 0;
    fake.partial_when(move |o| {
        if o["reduceOnly"] != true {
            return None;
        }
        n += 1;
        (n % 2 == 0).then_some(Partial::Fraction(dec!(0.34)))
    });
    ex.place_order(&req(
        "r0",
        OrderSide::Buy,
        dec!(0.06),
        OrderType::Market,
        None,
        false,
    ))
    .await
    .unwrap();
    for (coid, status) in [("r1", "FILLED"), ("r2", "EXPIRED"), ("r3", "FILLED")] {
        ex.place_order(&req(
            coid,
            OrderSide::Sell,
            dec!(0.015),
            OrderType::Market,
            None,
            true,
        ))
        .await
        .unwrap();
        assert_eq!(fake.order(coid).unwrap()["status"], status, "{coid}");
    }
    assert_eq!(fake.order("r0").unwrap()["status"], "FILLED");
    assert_eq!(
        fake.position("ETHUSDT"),
        dec!(0.06) - dec!(0.015) - dec!(0.005) - dec!(0.015)
    );
    // positionRisk without a symbol: a row per market.
    let (_, rows) = aster_call(&url, "GET", "/fapi/v2/positionRisk", &[]).await;
    let amts: Vec<(&str, &str)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["symbol"].as_str().unwrap(),
                r["positionAmt"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(amts, vec![("ETHUSDT", "0.025"), ("SOLUSDT", "0.000")]);
}

/// A close whose answer is lost and whose look-up fails too: the next attempt finds the broker
/// flat and its close there, and records it as what the first attempt saw it close, the short's
/// buy-back (not a long's sell).
#[tokio::test]
async fn aster_close_retried_after_its_answer_was_lost_is_recorded_as_the_shorts_buy_back() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_millis(700), json!({}));
    let short = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(100)),
    )
    .await;
    assert_eq!(short.status, JobStatus::Succeeded, "{short:?}");
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    for _ in 0..2 {
        fake.core.inject(
            "GET /fapi/v1/order",
            Fault::Reply(503, json!({"code": -1001, "msg": "Internal error"}), vec![]),
        );
    }
    let j = job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert!(!out.history.is_empty(), "a second attempt: {out:?}");
    assert_eq!(fake.orders_with(&client_order_id(j.job_id, Leg::Close)), 1);
    let close: Vec<_> = out.fills.iter().filter(|f| f.leg == Leg::Close).collect();
    assert_eq!(close.len(), 1, "{out:?}");
    assert_eq!(close[0].side, OrderSide::Buy, "{out:?}");
}
