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

// ---------------------------------------------------------------------------------------------
// The fake's broker behaviour for issue 12, and look-ups across days (issue 12 item 8)
// ---------------------------------------------------------------------------------------------

/// A UUIDv7 made `secs_ago` seconds ago (a job accepted then).
fn job_id_from(secs_ago: u64) -> uuid::Uuid {
    let t = chrono::Utc::now().timestamp() as u64 - secs_ago;
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, t, 0))
}

#[tokio::test]
async fn tradier_replay_the_next_day_finds_yesterdays_order_and_sends_nothing() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("AAPL", ExchangeKind::Tradier).unwrap();
    let today = fake.today();
    // Yesterday: the job is accepted and its order placed.
    fake.set_today(today - chrono::Days::new(1));
    let mut j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400));
    j.job_id = job_id_from(86_400);
    j.accepted_at = chrono::Utc::now() - chrono::Duration::days(1);
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(fake.orders_tagged(&open_id).len(), 1);

    // Past midnight, today's list no longer shows it.
    fake.set_today(today);
    let (s, v) = tradier_call(&url, "GET", "/orders?includeTags=true", &[]).await;
    assert_eq!((s, &v["orders"]), (200, &json!("null")));
    // The look-up still finds it, through a dated `filter=all` listing.
    let found = ex.find_order(&sym, &open_id).await.unwrap().unwrap();
    assert_eq!(
        (found.state, found.filled_qty),
        (sparky::exchanges::OrderState::Filled, dec!(2))
    );
    let ranged: Vec<Vec<(String, String)>> = fake
        .core
        .seen("GET /orders")
        .iter()
        .map(|s| params(&s.query))
        .filter(|q| param(q, "filter") == Some("all"))
        .collect();
    assert!(!ranged.is_empty());
    let yesterday = (today - chrono::Days::new(1)).to_string();
    let start = param(&ranged[0], "start").unwrap().to_string();
    assert!(start <= yesterday, "{start}");
    assert_eq!(
        param(&ranged[0], "end"),
        Some(chrono::Utc::now().date_naive().to_string().as_str())
    );

    // A replay of the job (a redelivery after a crash) finds the order and sends nothing.
    let posts = fake.core.seen("POST /orders").len();
    let out = sparky::executor::execute(&ex, &j, true, &fast_policy()).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.core.seen("POST /orders").len(),
        posts,
        "no second order"
    );
    assert_eq!(fake.orders_tagged(&open_id).len(), 1);
    assert_eq!(fake.position("AAPL"), dec!(2));
}

#[tokio::test]
async fn tradier_fake_orders_listing_is_today_only_unless_filter_all_with_a_range() {
    let (fake, url) = TradierFake::start().await;
    let today = fake.today();
    let day = |n: u64| (today - chrono::Days::new(n)).to_string();
    for (n, tag) in [(40, "d40"), (3, "d3"), (0, "d0")] {
        fake.set_today(today - chrono::Days::new(n));
        let (s, v) = tradier_call(
            &url,
            "POST",
            "/orders",
            &[
                ("class", "equity"),
                ("symbol", "AAPL"),
                ("side", "buy"),
                ("quantity", "1"),
                ("type", "limit"),
                ("price", "100"),
                ("duration", "gtc"),
                ("tag", tag),
            ],
        )
        .await;
        assert_eq!(s, 200, "{v}");
    }
    fake.set_today(today);
    let tags = |v: &serde_json::Value| -> Vec<String> {
        match &v["orders"]["order"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|o| o["tag"].as_str().unwrap().to_string())
                .collect(),
            serde_json::Value::Object(_) => {
                vec![v["orders"]["order"]["tag"].as_str().unwrap().to_string()]
            }
            _ => vec![],
        }
    };
    let (_, v) = tradier_call(&url, "GET", "/orders", &[]).await;
    assert_eq!(tags(&v), vec!["d0"]);
    let (_, v) = tradier_call(&url, "GET", &format!("/orders?date={}", day(3)), &[]).await;
    assert_eq!(tags(&v), vec!["d3"]);
    let (_, v) = tradier_call(
        &url,
        "GET",
        &format!("/orders?filter=all&start={}&end={}", day(10), day(0)),
        &[],
    )
    .await;
    assert_eq!(tags(&v), vec!["d3", "d0"]);
    // Without a start: a month back.
    let (_, v) = tradier_call(&url, "GET", "/orders?filter=all", &[]).await;
    assert_eq!(tags(&v), vec!["d3", "d0"]);
    // More than a month at once is refused.
    let (s, v) = tradier_call(
        &url,
        "GET",
        &format!("/orders?filter=all&start={}&end={}", day(45), day(0)),
        &[],
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (_, v) = tradier_call(
        &url,
        "GET",
        &format!("/orders?filter=all&start={}&end={}", day(45), day(30)),
        &[],
    )
    .await;
    assert_eq!(tags(&v), vec!["d40"]);
    assert_eq!(
        fake.orders_tagged("d40")[0]["create_date"]
            .as_str()
            .unwrap()[..10],
        day(40)
    );
    // Optionally, today's list also shows earlier orders that still work (unverified at Tradier).
    fake.st.lock().unwrap().intraday_lists_working = true;
    let (_, v) = tradier_call(&url, "GET", "/orders", &[]).await;
    assert_eq!(tags(&v), vec!["d40", "d3", "d0"]);
}

#[tokio::test]
async fn tradier_fake_oco_leg_fires_on_a_price_move_and_cancels_its_sibling() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let mut j = job(ExchangeKind::Tradier, Action::Buy, "SPY", dec!(1000));
    j.alert.stop_loss_percent = Some(dec!(5));
    j.alert.take_profit_percent = Some(dec!(10));
    assert_eq!(run(&ex, &j).await.status, JobStatus::Succeeded);
    assert_eq!(fake.position("SPY"), dec!(2));
    let oco = &fake.orders_tagged(&client_order_id(j.job_id, Leg::StopLoss))[0];
    let oco_id = oco["id"].as_u64().unwrap();
    assert_eq!(
        (oco["status"].as_str(), oco["num_legs"].as_u64()),
        (Some("open"), Some(2))
    );
    let legs = oco["leg"].as_array().unwrap();
    assert_eq!(
        (legs[0]["type"].as_str(), legs[0]["price"].as_f64()),
        (Some("limit"), Some(550.0))
    );
    assert_eq!(
        (legs[1]["type"].as_str(), legs[1]["stop"].as_f64()),
        (Some("stop"), Some(475.0))
    );
    assert_eq!(legs[1]["quantity"].as_f64(), Some(2.0));
    assert_eq!(legs[1]["duration"], "gtc");
    assert_eq!(fake.open_orders().len(), 1);

    fake.set_price("SPY", dec!(480));
    assert_eq!(fake.position("SPY"), dec!(2), "not crossed");
    fake.set_price("SPY", dec!(470));
    assert_eq!(fake.position("SPY"), dec!(0));
    let (_, v) = tradier_call(
        &url,
        "GET",
        &format!("/orders/{oco_id}?includeTags=true"),
        &[],
    )
    .await;
    let o = &v["order"];
    assert_eq!(o["status"], "filled");
    assert_eq!(
        (
            o["leg"][1]["status"].as_str(),
            o["leg"][1]["exec_quantity"].as_f64(),
            o["leg"][1]["avg_fill_price"].as_f64()
        ),
        (Some("filled"), Some(2.0), Some(470.0))
    );
    assert_eq!(
        o["leg"][0]["status"], "canceled",
        "the sibling leg is cancelled"
    );
    assert!(fake.open_orders().is_empty());
    // A final order cannot be cancelled.
    let (s, v) = tradier_call(&url, "DELETE", &format!("/orders/{oco_id}"), &[]).await;
    assert_eq!(s, 400);
    assert!(
        v["errors"]["error"]
            .as_str()
            .unwrap()
            .contains("order already in finalized state"),
        "{v}"
    );
}

#[tokio::test]
async fn tradier_fake_working_orders_cancel_and_partial_fills() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("AAPL", ExchangeKind::Tradier).unwrap();
    let req = |coid: &str, side, qty, order_type, limit_price| OrderRequest {
        on_fill: None,
        symbol: sym.clone(),
        side,
        quantity: qty,
        order_type,
        limit_price,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: coid.into(),
    };
    // A market order that fills 4 of 10: partially_filled on the first read, then canceled.
    fake.partial_next(dec!(0.4));
    let ack = ex
        .place_order(&req(
            "m1",
            OrderSide::Buy,
            dec!(10),
            OrderType::Market,
            None,
        ))
        .await
        .unwrap();
    assert_eq!(ack.filled_qty, dec!(4));
    assert_eq!(fake.position("AAPL"), dec!(4));
    let m1 = &fake.orders_tagged("m1")[0];
    assert_eq!(
        (
            m1["status"].as_str(),
            m1["exec_quantity"].as_f64(),
            m1["quantity"].as_f64()
        ),
        (Some("canceled"), Some(4.0), Some(10.0))
    );

    // A limit buy below the market works (open) and fills at its limit when the price comes down.
    let ack = ex
        .place_order(&req(
            "l1",
            OrderSide::Buy,
            dec!(3),
            OrderType::Limit,
            Some(dec!(185)),
        ))
        .await
        .unwrap();
    assert_eq!(ack.state, sparky::exchanges::OrderState::Accepted);
    let id = ack.exchange_order_id.parse::<u64>().unwrap();
    assert_eq!(fake.order(id).unwrap()["status"], "open");
    fake.set_price("AAPL", dec!(184));
    let l1 = ex.find_order(&sym, "l1").await.unwrap().unwrap();
    assert_eq!(
        (l1.state, l1.filled_qty, l1.avg_price),
        (
            sparky::exchanges::OrderState::Filled,
            dec!(3),
            Some(dec!(185))
        )
    );
    assert_eq!(fake.position("AAPL"), dec!(7));

    // A working stop is listed, cancelled over HTTP, and never fires.
    let (s, v) = tradier_call(
        &url,
        "POST",
        "/orders",
        &[
            ("class", "equity"),
            ("symbol", "AAPL"),
            ("side", "sell"),
            ("quantity", "7"),
            ("type", "stop"),
            ("stop", "170"),
            ("duration", "gtc"),
            ("tag", "s1"),
        ],
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let sid = v["order"]["id"].as_u64().unwrap();
    let (_, v) = tradier_call(&url, "GET", "/orders?includeTags=true", &[]).await;
    let open: Vec<_> = match &v["orders"]["order"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter(|o| o["status"] == "open")
            .cloned()
            .collect(),
        _ => vec![],
    };
    assert_eq!(open.len(), 1);
    assert_eq!(open[0]["tag"], "s1");
    let (s, v) = tradier_call(&url, "DELETE", &format!("/orders/{sid}"), &[]).await;
    assert_eq!(
        (s, &v),
        (200, &json!({"order": {"id": sid, "status": "ok"}}))
    );
    let (s, _) = tradier_call(&url, "DELETE", &format!("/orders/{sid}"), &[]).await;
    assert_eq!(s, 400, "cancelled is final");
    fake.set_price("AAPL", dec!(160));
    assert_eq!(fake.position("AAPL"), dec!(7));
    assert!(fake.open_orders().is_empty());
    // The position's cost basis follows the fills: 4 x 190 + 3 x 185.
    let p = ex.position(&sym).await.unwrap().unwrap();
    assert_eq!(
        p.entry_price,
        Some((dec!(4) * dec!(190) + dec!(3) * dec!(185)) / dec!(7))
            .map(|e| e.round_dp(6).normalize())
    );
    // A close that fills 2 of 7 (by quantity): the position keeps the other 5.
    fake.partial_next_qty(dec!(2));
    let ack = ex.close_position(&sym, &p, "c1").await.unwrap();
    assert_eq!(ack.filled_qty, dec!(2));
    assert_eq!(fake.position("AAPL"), dec!(5));
    assert_eq!(fake.orders_tagged("c1")[0]["status"], "canceled");
    // By rule: close legs (tags ending in `c`) fill one share.
    fake.partial_when(|o| {
        o["tag"]
            .as_str()
            .unwrap()
            .ends_with('c')
            .then_some(Partial::Qty(dec!(1)))
    });
    let p = ex.position(&sym).await.unwrap().unwrap();
    ex.close_position(&sym, &p, "x2c").await.unwrap();
    assert_eq!(fake.position("AAPL"), dec!(4));
    ex.close_position(&sym, &ex.position(&sym).await.unwrap().unwrap(), "x3")
        .await
        .unwrap();
    assert_eq!(fake.position("AAPL"), dec!(0));
}
