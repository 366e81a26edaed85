//! Issue 19: the original Sparky's published alert templates, pasted as a user would (placeholders
//! filled the way TradingView fills them, no `user_id`, no size), run end to end on the fake
//! brokers with a strategy that supplies what the template leaves out. And the 400s.

use reqwest::StatusCode;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::{CredentialEnv, ExchangeKind, OrderType, Sizing, SizingMode};
use sparky::exchanges::{client_order_id, Leg};
use sparky::job::JobStatus;
use sparky::strategy::Strategy;
use uuid::Uuid;

use crate::fakes::aster_app;
use crate::fakes::*;
use crate::helpers::*;

/// A strategy named `name` of `user`: the exchange (if any) and a USD size.
pub(crate) fn strategy(
    user: Uuid,
    name: &str,
    exchange: Option<ExchangeKind>,
    usd: rust_decimal::Decimal,
) -> Strategy {
    Strategy {
        user_id: user,
        name: name.into(),
        strategy_id: None,
        exchange,
        environment: None,
        sizing: Some(Sizing {
            mode: SizingMode::PositionSizeUsd,
            amount: usd,
        }),
        stop_loss_percent: None,
        take_profit_percent: None,
        trailing_stop_percent: None,
        order_type: None,
        enabled: true,
    }
}

/// The guide's simple shape, with `{{strategy.order.action}}` and `{{ticker}}` filled.
fn simple(secret: &str, strategy: &str, action: &str, ticker: &str) -> Value {
    json!({"secret": secret, "strategy": strategy, "action": action, "symbol": ticker})
}

/// The guide's full-override shape: exchange, order type, the strategy from the order comment,
/// stop-loss and take-profit.
fn full(secret: &str, exchange: &str, comment: &str, ticker: &str) -> Value {
    json!({"secret": secret, "exchange": exchange, "action": "buy", "symbol": ticker,
        "order_type": "market", "strategy": comment,
        "stop_loss_percent": 2, "take_profit_percent": 4})
}

#[tokio::test]
async fn aster_templates_run_end_to_end() {
    let (fake, _, app, user, secret) = aster_app().await;
    app.store
        .upsert_strategy(&strategy(
            user,
            "eth-trend",
            Some(ExchangeKind::Aster),
            dec!(100),
        ))
        .await
        .unwrap();
    // simple shape: exchange and size from the strategy; {{ticker}} with the exchange prefix
    let job = app
        .run_one(&simple(&secret, "eth-trend", "buy", "BINANCE:ETHUSDT"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(
        (job.exchange.as_str(), job.symbol.as_str()),
        ("aster", "ETHUSDT")
    );
    let t = &app.trades(user).await[0];
    assert_eq!(t.quantity, dec!(0.033), "100 USD at 3000, step 0.001");
    let job = app
        .run_one(&simple(&secret, "eth-trend", "close", "ETHUSDT"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    // full override: stop-loss and take-profit placed as Aster's native orders
    let job = app
        .run_one(&full(&secret, "aster", "eth-trend", "BINANCE:ETHUSDT"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let orders = fake.st.lock().unwrap().orders.clone();
    let sl = orders
        .iter()
        .find(|o| o["clientOrderId"] == client_order_id(job.job_id, Leg::StopLoss))
        .expect("stop-loss order");
    assert_eq!(sl["stopPrice"], "2940", "2% below 3000");
    let tp = orders
        .iter()
        .find(|o| o["clientOrderId"] == client_order_id(job.job_id, Leg::TakeProfit))
        .expect("take-profit order");
    assert_eq!(tp["stopPrice"], "3120", "4% above 3000");

    // the trailing template in pips: Aster's trailing stop takes a percent only -> 400 naming it
    let (status, v) = app
        .post_webhook(
            &json!({"secret": secret, "exchange": "aster", "action": "buy", "strategy": "eth-trend",
            "symbol": "ETHUSDT", "useTrailingStop": true, "trailing_stop_pips": 30}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "trailing_stop_pips", "{v}");
    app.cleanup().await;
}

#[tokio::test]
async fn oanda_templates_run_end_to_end_including_the_trailing_stop_in_pips() {
    let (fake, _, app, user, secret) = oanda_app().await;
    app.store
        .upsert_strategy(&strategy(user, "fx", Some(ExchangeKind::Oanda), dec!(100)))
        .await
        .unwrap();
    // the default strategy supplies the size for alerts that name none
    app.store
        .upsert_strategy(&strategy(user, "default", None, dec!(100)))
        .await
        .unwrap();

    let job = app
        .run_one(&simple(&secret, "fx", "buy", "OANDA:EURUSD"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.symbol, "EUR_USD");
    let job = app.run_one(&simple(&secret, "fx", "close", "EURUSD")).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    // the trailing-stop shape of the guide, verbatim: 30 pips = 0.0030 at pipLocation -4
    let job = app.run_one(&json!({"secret": secret, "exchange": "oanda", "action": "buy", "symbol": "OANDA:EURUSD",
            "useTrailingStop": true, "trailing_stop_pips": 30}),
    )
    .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let open = fake.orders_with(&client_order_id(job.job_id, Leg::Open));
    assert_eq!(
        open[0]["request"]["trailingStopLossOnFill"]["distance"], "0.003",
        "{open:?}"
    );
    let job = app.run_one(&simple(&secret, "fx", "close", "EURUSD")).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    // full override
    let job = app
        .run_one(&full(&secret, "oanda", "fx", "OANDA:EURUSD"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let open = fake.orders_with(&client_order_id(job.job_id, Leg::Open));
    let req = &open[0]["request"];
    // 2% / 4% from the mid 1.0851, rounded to 5 places
    assert_eq!(req["stopLossOnFill"]["price"], "1.0634");
    assert_eq!(req["takeProfitOnFill"]["price"], "1.1285");
    app.cleanup().await;
}

#[tokio::test]
async fn tradier_templates_run_end_to_end_and_the_trailing_template_is_refused() {
    let (fake, _, app, user, secret) = tradier_app().await;
    app.store
        .upsert_strategy(&strategy(
            user,
            "stocks",
            Some(ExchangeKind::Tradier),
            dec!(1000),
        ))
        .await
        .unwrap();
    let job = app.run_one(&simple(&secret, "stocks", "buy", "AAPL")).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    assert_eq!(
        app.trades(user).await[0].quantity,
        dec!(5),
        "1000 USD at 190"
    );
    let job = app
        .run_one(&simple(&secret, "stocks", "close", "NASDAQ:AAPL"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");

    let job = app
        .run_one(&full(&secret, "tradier", "stocks", "NASDAQ:AAPL"))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let protective = fake.orders_tagged(&client_order_id(job.job_id, Leg::StopLoss));
    assert_eq!(protective.len(), 1, "one OCO order");

    let (status, v) = app
        .post_webhook(&json!({"secret": secret, "exchange": "tradier", "action": "buy",
            "symbol": "AAPL", "strategy": "stocks", "useTrailingStop": true, "trailing_stop_percent": 1}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "trailing_stop_percent");
    assert!(v["error"].as_str().unwrap().contains("Tradier"), "{v}");
    app.cleanup().await;
}

#[tokio::test]
async fn missing_size_or_exchange_unknown_strategy_and_placeholders_are_400s() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // no strategy at all: the template gives neither exchange nor size
    let (status, v) = app
        .post_webhook(&simple(&secret, "", "buy", "BINANCE:ETHUSDT"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    let fields: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert!(fields.contains(&"exchange"), "{v}");
    assert!(fields.contains(&"position_size_usd"), "{v}");
    let text = v["error"].as_str().unwrap();
    assert!(
        text.contains("sparky strategy set"),
        "says where to set it: {v}"
    );

    // a strategy that gives the exchange but no size
    let mut s = strategy(user, "nosize", Some(ExchangeKind::Paper), dec!(1));
    s.sizing = None;
    app.store.upsert_strategy(&s).await.unwrap();
    let (status, v) = app
        .post_webhook(&simple(&secret, "nosize", "buy", "ETHUSDT"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "position_size_usd", "{v}");

    // an unknown strategy, by name and by id
    let (status, v) = app
        .post_webhook(&simple(&secret, "nope", "buy", "ETHUSDT"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "strategy");
    assert!(v["error"].as_str().unwrap().contains("`nope`"), "{v}");
    let (status, v) = app
        .post_webhook(&json!({"secret": secret, "strategy_id": "s-404", "action": "buy", "symbol": "ETHUSDT"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "strategy_id");

    // a template pasted into a non-strategy alert: the placeholder arrives literally
    let (status, v) = app
        .post_webhook(&simple(
            &secret,
            "nosize",
            "{{strategy.order.action}}",
            "ETHUSDT",
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "action");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("{{strategy.order.action}}")
            && v["error"].as_str().unwrap().contains("not replaced"),
        "{v}"
    );
    let (status, v) = app
        .post_webhook(&simple(
            &secret,
            "{{strategy.order.comment}}",
            "buy",
            "ETHUSDT",
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "strategy");
    assert_eq!(app.queued_entries().await, 0, "nothing was enqueued");
    app.cleanup().await;
}

#[tokio::test]
async fn user_id_is_optional_and_a_present_one_must_be_the_secrets_owner() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let (other, _) = app.paper_user().await;
    let body = json!({"secret": secret, "exchange": "paper", "action": "buy",
        "symbol": "ETHUSDT", "position_size_usd": 100});
    let id = app.enqueue(&body).await;
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!((job.user_id, job.status), (user, JobStatus::Succeeded));
    for key in ["user_id", "userId"] {
        let mut b = body.clone();
        b[key] = json!(other);
        let (status, _) = app.post_webhook(&b).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{key} of another user");
        b[key] = json!(user);
        b["alert_id"] = json!(format!("ok-{key}"));
        let (status, v) = app.post_webhook(&b).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{key} of the owner: {v}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_strategy_sets_environment_order_type_and_alert_fields_override_it() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut s = strategy(user, "swing", Some(ExchangeKind::Paper), dec!(100));
    s.strategy_id = Some("s-7".into());
    s.environment = Some(CredentialEnv::Production);
    s.order_type = Some(OrderType::Market);
    s.stop_loss_percent = Some(dec!(1));
    app.store.upsert_strategy(&s).await.unwrap();
    // found by strategy_id; the alert's own size and stop-loss price win
    let id = app
        .enqueue(
            &json!({"secret": secret, "strategy_id": "s-7", "action": "buy",
            "symbol": "ETHUSDT", "quantity": "0.05", "stop_loss_price": 2900}),
        )
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let (env, _) = app.store.job_envelope(id).await.unwrap().unwrap();
    assert_eq!(env.alert.strategy.as_deref(), Some("swing"));
    assert_eq!(env.alert.quantity, Some(dec!(0.05)));
    assert_eq!(env.alert.position_size_usd, None);
    assert_eq!(env.alert.stop_loss_percent, None);
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!(
        (p.quantity, p.stop_loss_price),
        (dec!(0.05), Some(dec!(2900)))
    );
    app.cleanup().await;
}
