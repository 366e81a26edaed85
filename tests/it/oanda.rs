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

// ---------------------------------------------------------------------------------------------
// The fake's broker behaviour for issue 12: trades, dependent orders, pending orders, cancel
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oanda_fake_on_fill_orders_go_with_the_trade_when_the_position_is_closed() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let mut j = job(ExchangeKind::Oanda, Action::Sell, "EUR_USD", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(1));
    j.alert.take_profit_percent = Some(dec!(2));
    assert_eq!(run(&ex, &j).await.status, JobStatus::Succeeded);
    let open_id = client_order_id(j.job_id, Leg::Open);
    let trade = fake.trade(&format!("@{open_id}")).unwrap();
    assert_eq!(
        (trade["state"].as_str(), trade["currentUnits"].as_str()),
        (Some("OPEN"), Some("-92"))
    );
    // The dependent orders are PENDING, tied to the trade, and listed as pending orders.
    let (s, v) = oanda_call(&url, "GET", "/pendingOrders", None).await;
    assert_eq!(s, 200);
    let pending = v["orders"].as_array().unwrap();
    assert_eq!(pending.len(), 2);
    for o in pending {
        // As OANDA's dependent orders: the trade's id and client id, no instrument.
        assert_eq!(o["tradeID"], trade["id"]);
        assert_eq!(o["clientTradeID"], open_id.as_str());
        assert!(o.get("instrument").is_none(), "{o}");
    }
    let sl_id = client_order_id(j.job_id, Leg::StopLoss);
    let (_, sl) = oanda_call(&url, "GET", &format!("/orders/@{sl_id}"), None).await;
    assert_eq!(
        (sl["order"]["type"].as_str(), sl["order"]["state"].as_str()),
        (Some("STOP_LOSS"), Some("PENDING"))
    );
    assert_eq!(trade["stopLossOrderID"], sl["order"]["id"]);
    let (_, v) = oanda_call(
        &url,
        "GET",
        "/orders?state=PENDING&instrument=EUR_USD",
        None,
    )
    .await;
    assert_eq!(v["orders"].as_array().unwrap().len(), 2);

    // Closing the position closes the trade; OANDA cancels its orders (LINKED_TRADE_CLOSED).
    let c = job(ExchangeKind::Oanda, Action::Close, "EUR_USD", dec!(100));
    assert_eq!(run(&ex, &c).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("EUR_USD"), dec!(0));
    let trade = fake.trade(trade["id"].as_str().unwrap()).unwrap();
    assert_eq!(trade["state"], "CLOSED");
    assert!(fake.pending_orders().is_empty());
    let (_, v) = oanda_call(&url, "GET", "/pendingOrders", None).await;
    assert_eq!(v["orders"], json!([]));
    for leg in [Leg::StopLoss, Leg::TakeProfit] {
        let (_, o) = oanda_call(
            &url,
            "GET",
            &format!("/orders/@{}", client_order_id(j.job_id, leg)),
            None,
        )
        .await;
        assert_eq!(o["order"]["state"], "CANCELLED");
        let t = o["order"]["cancellingTransactionID"].as_str().unwrap();
        let (_, t) = oanda_call(&url, "GET", &format!("/transactions/{t}"), None).await;
        assert_eq!(
            (
                t["transaction"]["type"].as_str(),
                t["transaction"]["reason"].as_str()
            ),
            (Some("ORDER_CANCEL"), Some("LINKED_TRADE_CLOSED"))
        );
    }
    // Cancelling one of them now: it no longer exists as a pending order.
    let (s, v) = oanda_call(&url, "PUT", &format!("/orders/@{sl_id}/cancel"), None).await;
    assert_eq!(
        (s, v["errorCode"].as_str()),
        (404, Some("ORDER_DOESNT_EXIST")),
        "{v}"
    );
    assert_eq!(
        v["orderCancelRejectTransaction"]["rejectReason"],
        "ORDER_DOESNT_EXIST"
    );
}

#[tokio::test]
async fn oanda_fake_stop_loss_fires_on_a_price_move_and_closes_its_trade() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap();
    let mut j = job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(1));
    j.alert.take_profit_percent = Some(dec!(2));
    assert_eq!(run(&ex, &j).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("EUR_USD"), dec!(92));
    let sl_id = client_order_id(j.job_id, Leg::StopLoss);
    let tp_id = client_order_id(j.job_id, Leg::TakeProfit);
    let sl_price = dv_of(&fake.orders_with(&sl_id)[0]["price"]);
    let (_, last) = oanda_call(&url, "GET", "/openTrades", None).await;
    let before = last["lastTransactionID"].as_str().unwrap().to_string();

    fake.set_price("EUR_USD", sl_price + dec!(0.0001));
    assert_eq!(fake.position("EUR_USD"), dec!(92), "not crossed");
    fake.set_price("EUR_USD", sl_price - dec!(0.0010));
    assert_eq!(fake.position("EUR_USD"), dec!(0));
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    // The stop-loss is FILLED and the client sees the exit with its price.
    let sl = ex.find_order(&sym, &sl_id).await.unwrap().unwrap();
    assert_eq!(
        (sl.state, sl.filled_qty, sl.avg_price),
        (OrderState::Filled, dec!(92), Some(sl_price - dec!(0.0010)))
    );
    let order = &fake.orders_with(&sl_id)[0];
    let (_, fill) = oanda_call(
        &url,
        "GET",
        &format!(
            "/transactions/{}",
            order["fillingTransactionID"].as_str().unwrap()
        ),
        None,
    )
    .await;
    let fill = &fill["transaction"];
    assert_eq!(
        (
            fill["type"].as_str(),
            fill["reason"].as_str(),
            fill["units"].as_str()
        ),
        (Some("ORDER_FILL"), Some("STOP_LOSS_ORDER"), Some("-92"))
    );
    let open_trade = fake
        .trade(&format!("@{}", client_order_id(j.job_id, Leg::Open)))
        .unwrap();
    assert_eq!(fill["tradesClosed"][0]["tradeID"], open_trade["id"]);
    assert!(dv_of(&fill["pl"]) < rust_decimal::Decimal::ZERO, "{fill}");
    // The trade is CLOSED by the stop-loss, and the take-profit cancelled with it.
    assert_eq!(open_trade["state"], "CLOSED");
    assert_eq!(open_trade["closingTransactionIDs"], json!([fill["id"]]));
    assert_eq!(open_trade["averageClosePrice"], fill["price"]);
    assert_eq!(fake.orders_with(&tp_id)[0]["state"], "CANCELLED");
    let (_, closed) =
        oanda_call(&url, "GET", "/trades?state=CLOSED&instrument=EUR_USD", None).await;
    assert_eq!(closed["trades"][0]["id"], open_trade["id"]);
    assert_eq!(closed["trades"][0]["realizedPL"], fill["pl"]);
    // The change feed since before the move: the fill, then the cancel.
    let (_, since) = oanda_call(
        &url,
        "GET",
        &format!("/transactions/sinceid?id={before}"),
        None,
    )
    .await;
    let types: Vec<&str> = since["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["ORDER_FILL", "ORDER_CANCEL"]);
}

fn dv_of(v: &Value) -> rust_decimal::Decimal {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn oanda_fake_working_limit_cancel_and_trade_orders() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap();
    let limit = |coid: &str, price| OrderRequest {
        on_fill: Some(sparky::exchanges::OnFill {
            stop_loss: Some(dec!(1.07)),
            take_profit: None,
            trailing_stop: None,
        }),
        symbol: sym.clone(),
        side: OrderSide::Buy,
        quantity: dec!(100),
        order_type: OrderType::Limit,
        limit_price: Some(price),
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: coid.into(),
    };
    // A buy limit below the ask rests (PENDING) and can be cancelled by client id.
    let a = ex.place_order(&limit("spl1o", dec!(1.08))).await.unwrap();
    assert_eq!(a.state, OrderState::Accepted);
    assert_eq!(fake.pending_orders().len(), 1);
    let (s, v) = oanda_call(&url, "PUT", "/orders/@spl1o/cancel", None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (
            v["orderCancelTransaction"]["reason"].as_str(),
            v["orderCancelTransaction"]["clientOrderID"].as_str()
        ),
        (Some("CLIENT_REQUEST"), Some("spl1o"))
    );
    let (s, _) = oanda_call(&url, "PUT", "/orders/@spl1o/cancel", None).await;
    assert_eq!(s, 404);
    fake.set_price("EUR_USD", dec!(1.07900));
    assert_eq!(
        fake.position("EUR_USD"),
        dec!(0),
        "a cancelled limit never fills"
    );

    // Another rests until the ask reaches it, then fills at its price with its stop-loss on fill.
    fake.set_quote("EUR_USD", dec!(1.08500), dec!(1.08520));
    ex.place_order(&limit("spl2o", dec!(1.08))).await.unwrap();
    fake.set_quote("EUR_USD", dec!(1.07990), dec!(1.08000));
    assert_eq!(fake.position("EUR_USD"), dec!(100));
    let found = ex.find_order(&sym, "spl2o").await.unwrap().unwrap();
    assert_eq!(
        (found.state, found.avg_price),
        (OrderState::Filled, Some(dec!(1.08)))
    );
    let trades = fake.open_trades("EUR_USD");
    assert_eq!(trades.len(), 1);
    let tid = trades[0]["id"].as_str().unwrap().to_string();
    let sl = fake.pending_orders();
    assert_eq!(
        (sl.len(), sl[0]["type"].as_str(), sl[0]["tradeID"].as_str()),
        (1, Some("STOP_LOSS"), Some(tid.as_str()))
    );
    // The trade's stop-loss is replaced, then removed, through PUT /trades/{id}/orders.
    let (s, v) = oanda_call(
        &url,
        "PUT",
        &format!("/trades/{tid}/orders"),
        Some(json!({"stopLoss": {"price": "1.06", "timeInForce": "GTC"}})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["stopLossOrderCancelTransaction"]["reason"],
        "CLIENT_REQUEST_REPLACED"
    );
    assert_eq!(fake.pending_orders()[0]["price"], "1.06");
    let (s, v) = oanda_call(
        &url,
        "PUT",
        &format!("/trades/{tid}/orders"),
        Some(json!({"stopLoss": null})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(fake.pending_orders().is_empty());
    fake.set_price("EUR_USD", dec!(1.0));
    assert_eq!(fake.position("EUR_USD"), dec!(100), "no stop left");
    // A partial close reduces the trade, which stays open under its id.
    let (s, v) = oanda_call(
        &url,
        "PUT",
        "/positions/EUR_USD/close",
        Some(json!({"longUnits": "40"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["longOrderFillTransaction"]["tradeReduced"]["units"],
        "-40"
    );
    assert_eq!(fake.position("EUR_USD"), dec!(60));
    let (_, p) = oanda_call(&url, "GET", "/positions/EUR_USD", None).await;
    assert_eq!(
        (
            p["position"]["long"]["units"].as_str(),
            p["position"]["long"]["tradeIDs"][0].as_str()
        ),
        (Some("60"), Some(tid.as_str()))
    );
}

/// `openOrders` of one instrument lists only the dependent orders (stop-loss, take-profit) of that
/// instrument's trades. OANDA's dependent orders carry no instrument and `openTrades` lists every
/// instrument's trades; counting another instrument's stops as this one's made a close of EUR_USD
/// record them cancelled (they kept resting) and a sweep of a flat EUR_USD cancel them at OANDA.
#[tokio::test]
async fn oanda_open_orders_of_an_instrument_leave_out_other_instruments_stops() {
    let (_fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let mut ids = vec![];
    for symbol in ["EUR_USD", "XAU_USD"] {
        let mut j = job(ExchangeKind::Oanda, Action::Buy, symbol, dec!(1000));
        j.alert.stop_loss_percent = Some(dec!(1));
        j.alert.take_profit_percent = Some(dec!(2));
        assert_eq!(run(&ex, &j).await.status, JobStatus::Succeeded);
        ids.push(j.job_id);
    }
    for (symbol, job_id) in ["EUR_USD", "XAU_USD"].into_iter().zip(&ids) {
        let sym = Symbol::parse(symbol, ExchangeKind::Oanda).unwrap();
        let mut listed: Vec<String> = ex
            .open_orders(&sym)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|o| o.client_order_id)
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                client_order_id(*job_id, Leg::StopLoss),
                client_order_id(*job_id, Leg::TakeProfit)
            ],
            "{symbol}"
        );
    }
}
