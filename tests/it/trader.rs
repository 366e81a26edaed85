//! Issue 14: sizing modes (paper and the Aster fake), the original Sparky's alert fields (the
//! ones that used to degrade silently), trailing stops, and every risk rule (blocks the open, lets
//! the close through, blocks when it cannot be evaluated).

use std::time::Duration;

use chrono::{NaiveTime, Timelike, Utc};
use reqwest::StatusCode;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::{ExchangeKind, OrderType};
use sparky::exchanges::{client_order_id, Leg};
use sparky::job::{FailureClass, JobStatus};
use sparky::risk::RiskLimits;
use sparky::store::Begin;
use sparky::store::JobRow;
use uuid::Uuid;

use crate::fakes::*;
use crate::helpers::*;
use crate::templates::strategy;

fn order(secret: &str, exchange: &str, action: &str, symbol: &str, extra: Value) -> Value {
    let mut v = json!({"secret": secret, "exchange": exchange, "action": action, "symbol": symbol});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// A $100 paper buy of SOLUSDT: the open the risk tests block or let through.
fn buy_sol(secret: &str) -> Value {
    order(
        secret,
        "paper",
        "buy",
        "SOLUSDT",
        json!({"position_size_usd": 100}),
    )
}

/// The quantity of the open leg of job `id`.
async fn opened(app: &TestApp, user: Uuid, id: Uuid) -> Decimal {
    app.trades(user)
        .await
        .into_iter()
        .find(|t| t.job_id == id && t.leg == "open")
        .unwrap_or_else(|| panic!("no open leg for {id}"))
        .quantity
}

// ---------------------------------------------------------------------------------------------
// Sizing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_sizing_mode_on_paper_rounds_down_and_checks_the_minimums() {
    let app = TestApp::spawn().await;
    // ETHUSDT on paper: 3000, step 0.001, minimum notional 5; a balance of 20000
    let (user, secret) = app.paper_user_with(json!({"balance": 20000})).await;
    let cases = [
        (json!({"position_size_usd": 100}), dec!(0.033)),
        (json!({"quantity": "0.0339"}), dec!(0.033)),
        // 1% of 20000 = 200 USD
        (json!({"percent_of_equity": 1}), dec!(0.066)),
        // 30 USD over a 1% stop (30 USD a unit)
        (json!({"risk_usd": 30, "stop_loss_percent": 1}), dec!(1)),
        // 0.3% of 20000 = 60 USD over a stop 60 below
        (
            json!({"risk_percent": "0.3", "stop_loss_price": 2940}),
            dec!(1),
        ),
    ];
    for (size, want) in cases {
        let job = app
            .run_one(&order(&secret, "paper", "buy", "ETHUSDT", size.clone()))
            .await;
        assert_eq!(job.status, JobStatus::Succeeded, "{size}: {job:?}");
        assert_eq!(opened(&app, user, job.job_id).await, want, "{size}");
        let close = app
            .run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
            .await;
        assert_eq!(close.status, JobStatus::Succeeded);
    }
    // below the minimums: rejected with the numbers, nothing placed
    for (size, says) in [
        (json!({"quantity": "0.0009"}), "rounds down to 0"),
        (json!({"quantity": "0.001"}), "below the minimum 5"),
        (json!({"percent_of_equity": "0.001"}), "rounds down to 0"),
    ] {
        let job = app
            .run_one(&order(&secret, "paper", "buy", "ETHUSDT", size.clone()))
            .await;
        assert_eq!(job.status, JobStatus::Rejected, "{size}");
        assert!(
            job.error.as_deref().unwrap().contains(says),
            "{size}: {job:?}"
        );
    }
    // a risk size needs a stop-loss; two sizes are one too many
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"risk_usd": 30}),
        ))
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("risk_usd")),
        "{v}"
    );
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"quantity": 1, "position_size_usd": 10}),
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    app.cleanup().await;
}

async fn aster_app_with(
    tweak: impl FnOnce(&mut sparky::config::Config),
) -> (std::sync::Arc<AsterFake>, TestApp, Uuid, String) {
    let (fake, url) = AsterFake::start().await;
    let app = TestApp::spawn_with(|c| {
        c.aster_base_url = Some(url.clone());
        c.exchange_retries = 1;
        c.exchange_retry_max = Duration::from_millis(300);
        tweak(c);
    })
    .await;
    let (user, secret) = app.create_user().await;
    store_credentials(
        &app,
        user,
        "aster",
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({}),
    )
    .await;
    (fake, app, user, secret)
}

#[tokio::test]
async fn every_sizing_mode_on_the_aster_fake() {
    let (fake, app, user, secret) = aster_app_with(|_| {}).await;
    // equity (totalMarginBalance) 10000; ETHUSDT 3000, market step 0.001, min notional 5
    let cases = [
        (json!({"position_size_usd": 100}), dec!(0.033)),
        (json!({"quantity": "0.0339"}), dec!(0.033)),
        (json!({"percent_of_equity": 1}), dec!(0.033)),
        (json!({"risk_usd": 30, "stop_loss_percent": 1}), dec!(1)),
        (
            json!({"risk_percent": "0.6", "stop_loss_price": 2940}),
            dec!(1),
        ),
    ];
    for (size, want) in cases {
        let job = app
            .run_one(&order(&secret, "aster", "buy", "ETHUSDT", size.clone()))
            .await;
        assert_eq!(job.status, JobStatus::Succeeded, "{size}: {job:?}");
        assert_eq!(opened(&app, user, job.job_id).await, want, "{size}");
        let sent = fake.orders_with(&client_order_id(job.job_id, Leg::Open));
        assert_eq!(sent, 1);
        let close = app
            .run_one(&order(&secret, "aster", "close", "ETHUSDT", json!({})))
            .await;
        assert_eq!(close.status, JobStatus::Succeeded);
    }
    assert!(
        !fake.core.seen("GET /fapi/v4/account").is_empty(),
        "equity read from the account endpoint"
    );
    let job = app
        .run_one(&order(
            &secret,
            "aster",
            "buy",
            "ETHUSDT",
            json!({"quantity": "0.001"}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("below the minimum 5"),
        "{job:?}"
    );
    // equity unreadable: a percent size cannot be computed, nothing is sent
    fake.st.lock().unwrap().equity = None;
    let before = fake.st.lock().unwrap().orders.len();
    let job = app
        .run_one(&order(
            &secret,
            "aster",
            "buy",
            "ETHUSDT",
            json!({"percent_of_equity": 1}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Dead, "{job:?}");
    assert_eq!(fake.st.lock().unwrap().orders.len(), before);
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// The original Sparky's alerts
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn original_format_alerts_are_honoured_not_degraded() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // camelCase: userId, orderType (limit, not market), positionSizeUsd, stopLossPercent, takeProfitPercent
    let job = app.run_one(&json!({"secret": secret, "userId": user, "exchange": "paper", "action": "buy",
            "symbol": "ETHUSDT", "orderType": "limit", "price": 3100, "positionSizeUsd": 310,
            "stopLossPercent": 2, "takeProfitPercent": 4, "comment": "from TradingView", "leverage": 5}),
    )
    .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let (env, _) = app.store.job_envelope(job.job_id).await.unwrap().unwrap();
    assert_eq!(env.alert.order_type, OrderType::Limit, "orderType honoured");
    assert_eq!(env.alert.position_size_usd, Some(dec!(310)));
    assert_eq!(
        env.alert.ignored_fields,
        vec!["comment", "leverage"],
        "unknown fields listed"
    );
    // sized at the limit price 3100: 0.1
    assert_eq!(opened(&app, user, job.job_id).await, dec!(0.1));
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!(
        (p.stop_loss_price, p.take_profit_price),
        (Some(dec!(2940)), Some(dec!(3120)))
    );
    // the job record shows them
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{}", job.job_id)))
        .header("X-Sparky-Secret", &secret)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ignored_fields"], json!(["comment", "leverage"]), "{v}");

    // a limit the paper exchange cannot fill is refused as a limit, never run as a market order
    let job = app
        .run_one(
            &json!({"secret": secret, "exchange": "paper", "action": "buy", "symbol": "SOLUSDT",
            "orderType": "limit", "price": 100, "positionSizeUsd": 100}),
        )
        .await;
    assert_eq!(job.status, JobStatus::Rejected);
    assert!(
        job.error.as_deref().unwrap().contains("not marketable"),
        "{job:?}"
    );

    // stopLoss / takeProfit, and absolute prices
    app.run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
        .await;
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "sell",
            "ETHUSDT",
            json!({"positionSizeUsd": 300, "stopLoss": 1, "takeProfit": 3}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!(
        (p.stop_loss_price, p.take_profit_price),
        (Some(dec!(3030)), Some(dec!(2910)))
    );
    app.run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
        .await;
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"position_size_usd": 300,
            "stop_loss_price": "2800.5", "take_profit_price": 3500}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!(
        (p.stop_loss_price, p.take_profit_price),
        (Some(dec!(2800.5)), Some(dec!(3500)))
    );
    // a stop on the wrong side is refused, not placed
    app.run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
        .await;
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"risk_usd": 10, "stop_loss_price": 3100}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("must be below the price 3000"),
        "{job:?}"
    );

    // sell_percentage is close_percent: half of a 0.1 ETHUSDT long is closed, half stays
    app.enqueue(&order(
        &secret,
        "paper",
        "buy",
        "ETHUSDT",
        json!({"position_size_usd": 300}),
    ))
    .await;
    app.run_worker_until_idle().await;
    assert_eq!(
        app.position(user, "ETHUSDT").await.map(|p| p.quantity),
        Some(dec!(0.1))
    );
    let id = app
        .enqueue(&order(
            &secret,
            "paper",
            "close",
            "ETHUSDT",
            json!({"sell_percentage": 50}),
        ))
        .await;
    let (env, _) = loop {
        app.run_worker_until_idle().await;
        if let Some(e) = app.store.job_envelope(id).await.unwrap() {
            break e;
        }
    };
    assert_eq!(env.alert.close_percent, Some(dec!(50)));
    assert_eq!(app.job(id).await.status, JobStatus::Succeeded);
    assert_eq!(
        app.position(user, "ETHUSDT").await.map(|p| p.quantity),
        Some(dec!(0.05)),
        "sell_percentage 50 closed half"
    );

    // the original name and Sparky's name with different values: a 400, not a silent choice
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"position_size_usd": 100, "stopLoss": 2, "stop_loss_percent": 3}),
        ))
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("stopLoss")),
        "{v}"
    );
    // a stop percent and a stop price at once
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"position_size_usd": 100, "stopLossPercent": 2, "stop_loss_price": 2900}),
        ))
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("stop_loss_price")),
        "{v}"
    );
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Trailing stops
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn trailing_stops_use_the_native_orders_or_are_refused() {
    let (fake, app, _user, secret) = aster_app_with(|_| {}).await;
    let job = app
        .run_one(&order(
            &secret,
            "aster",
            "buy",
            "ETHUSDT",
            json!({"position_size_usd": 100, "trailing_stop_percent": 1}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let orders = fake.st.lock().unwrap().orders.clone();
    let trail = orders
        .iter()
        .find(|o| o["type"] == "TRAILING_STOP_MARKET")
        .expect("a native trailing stop");
    assert_eq!(
        (trail["priceRate"].as_str(), trail["side"].as_str()),
        (Some("1"), Some("SELL"))
    );
    assert_eq!(trail["origQty"], "0.033");
    assert_eq!(trail["reduceOnly"], true);
    // out of Aster's callback range
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "aster",
            "buy",
            "BTCUSDT",
            json!({"position_size_usd": 100, "trailing_stop_percent": 10}),
        ))
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("trailing_stop_percent")),
        "{v}"
    );
    // useTrailingStop without a distance
    let (status, v) = app
        .post_webhook(&order(
            &secret,
            "aster",
            "buy",
            "BTCUSDT",
            json!({"position_size_usd": 100, "useTrailingStop": true}),
        ))
        .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("useTrailingStop")),
        "{v}"
    );
    app.cleanup().await;

    // OANDA: a percent becomes a price distance on the fill
    let (fake, _, app, _user, secret) = oanda_app().await;
    let job = app
        .run_one(&order(
            &secret,
            "oanda",
            "buy",
            "EURUSD",
            json!({"position_size_usd": 100, "trailing_stop_percent": 1}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    let open = fake.orders_with(&client_order_id(job.job_id, Leg::Open));
    // 1% of the mid 1.0851, to the instrument's 5 places
    assert_eq!(
        open[0]["request"]["trailingStopLossOnFill"]["distance"],
        "0.01085"
    );
    app.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Risk limits
// ---------------------------------------------------------------------------------------------

fn no_limits(user: Uuid) -> RiskLimits {
    RiskLimits {
        user_id: user,
        time_zone: "UTC".into(),
        ..RiskLimits::default()
    }
}

/// A paper user with an open ETHUSDT long (opened before any limit).
async fn user_with_a_long(app: &TestApp) -> (Uuid, String, Uuid) {
    let (user, secret) = app.paper_user().await;
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "buy",
            "ETHUSDT",
            json!({"position_size_usd": 100}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded);
    (user, secret, job.job_id)
}

/// A paper open's first delivery reads its limits and its stored position in one statement
/// (`Store::limits_and_position`): the same limits as `risk_limits_for` (the user's row and the
/// job's strategy's, no other strategy's) and the same position as `position`, with or without
/// either.
#[tokio::test]
async fn limits_and_position_read_together_what_each_read_alone() {
    let app = TestApp::spawn().await;
    let store = &app.store;
    let (user, _, _) = user_with_a_long(&app).await;
    let account = sparky::domain::Account {
        user_id: user,
        exchange: ExchangeKind::Paper,
        environment: sparky::domain::CredentialEnv::Production,
    };
    let alone = async |strategy: Option<&str>, symbol: &str| {
        (
            store.risk_limits_for(user, strategy).await.unwrap(),
            store.position(&account, symbol).await.unwrap(),
        )
    };
    let together = async |strategy: Option<&str>, symbol: &str| {
        store
            .limits_and_position(user, strategy, &account, symbol)
            .await
            .unwrap()
    };

    // Positions of the same user in SOLUSDT on other accounts are not this account's.
    for (exchange, environment) in [("paper", "sandbox"), ("aster", "production")] {
        sqlx::query(
            "INSERT INTO positions (user_id, exchange, environment, symbol, side, quantity, entry_price)
             VALUES ($1, $2, $3, 'SOLUSDT', 'short', 2, 150)",
        )
        .bind(user)
        .bind(exchange)
        .bind(environment)
        .execute(&store.pool)
        .await
        .unwrap();
    }

    // No limits; a position and none.
    let (limits, long) = together(None, "ETHUSDT").await;
    assert!(limits.is_empty());
    assert_eq!(
        long.as_ref().map(|p| p.side),
        Some(sparky::domain::Side::Long)
    );
    assert_eq!((limits, long), alone(None, "ETHUSDT").await);
    assert_eq!(together(None, "SOLUSDT").await, (vec![], None));

    // The user's row, two strategies' rows: a job of `s1` gets the user's and s1's.
    for strategy in [Some("s2"), Some("s1"), None] {
        let mut l = no_limits(user);
        l.strategy = strategy.map(str::to_string);
        l.max_trades_per_day = Some(7);
        store.upsert_risk_limits(&l).await.unwrap();
    }
    let (limits, long) = together(Some("s1"), "ETHUSDT").await;
    let strategies: Vec<_> = limits.iter().map(|l| l.strategy.as_deref()).collect();
    assert_eq!(strategies, [None, Some("s1")]);
    assert!(long.is_some());
    assert_eq!((limits, long), alone(Some("s1"), "ETHUSDT").await);
    let (limits, flat) = together(None, "SOLUSDT").await;
    assert_eq!(limits.len(), 1);
    assert_eq!((limits, flat), alone(None, "SOLUSDT").await);
    app.cleanup().await;
}

/// Blocked because the limits cannot be evaluated (unreadable, or not decodable).
fn assert_unevaluable(job: &JobRow) {
    assert_blocked(job, "limits");
    let e = job.error.as_deref().unwrap();
    assert!(e.contains("cannot be evaluated"), "{job:?}");
}

fn assert_blocked(job: &JobRow, rule: &str) {
    assert_eq!(job.status, JobStatus::Blocked, "{job:?}");
    assert_eq!(job.error_class, Some(FailureClass::Risk));
    let e = job.error.as_deref().unwrap();
    assert!(e.starts_with(&format!("blocked by {rule}:")), "{e}");
}

/// The life of one rule: `limits` set after the user opened ETHUSDT; an open in SOLUSDT is
/// blocked by `rule`, the ETHUSDT close goes through, and with the limits made unevaluable (a
/// time zone Postgres does not know, written behind the CLI's back) an open is blocked too.
async fn rule_blocks_opens_not_closes(
    rule: &str,
    set: impl FnOnce(&mut RiskLimits),
    prepare: impl AsyncFnOnce(&TestApp, &str, Uuid, Uuid),
) {
    let app = TestApp::spawn().await;
    let (user, secret, first) = user_with_a_long(&app).await;
    let mut l = no_limits(user);
    set(&mut l);
    app.store.upsert_risk_limits(&l).await.unwrap();
    prepare(&app, &secret, user, first).await;
    let blocked = app.run_one(&buy_sol(&secret)).await;
    assert_blocked(&blocked, rule);
    assert!(
        app.trades(user)
            .await
            .iter()
            .all(|t| t.job_id != blocked.job_id),
        "no order sent"
    );
    let close = app
        .run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
        .await;
    assert_eq!(
        close.status,
        JobStatus::Succeeded,
        "closes are never blocked: {close:?}"
    );
    assert!(app.position(user, "ETHUSDT").await.is_none());

    let open_sol = |n: &str| {
        order(
            &secret,
            "paper",
            "buy",
            "SOLUSDT",
            json!({"position_size_usd": 100, "alert_id": n}),
        )
    };
    let static_rule = matches!(rule, "kill_switch" | "symbol_not_allowed" | "symbol_denied");
    if !static_rule {
        // the counts cannot be made: a time zone Postgres does not know
        sqlx::query("UPDATE risk_limits SET time_zone = 'Not/AZone' WHERE user_id = $1")
            .bind(user)
            .execute(&app.store.pool)
            .await
            .unwrap();
        let job = app.run_one(&open_sol("tz")).await;
        assert_unevaluable(&job);
    }
    // the limits cannot be read at all
    sqlx::query("ALTER TABLE risk_limits RENAME TO risk_limits_gone")
        .execute(&app.store.pool)
        .await
        .unwrap();
    let job = app.run_one(&open_sol("gone")).await;
    assert_unevaluable(&job);
    let close = app
        .run_one(&order(&secret, "paper", "close", "SOLUSDT", json!({})))
        .await;
    assert_eq!(
        close.status,
        JobStatus::Skipped,
        "closes still run (nothing to close): {close:?}"
    );
    app.cleanup().await;
}

async fn nothing(_: &TestApp, _: &str, _: Uuid, _: Uuid) {}

/// A delivery that started and died before placing anything runs again as a first run: limits set
/// meanwhile apply to it (a kill switch blocks it), as they do to a replay. (One that finds an
/// order of the job is finishing it and is not blocked: `recovery::a_worker_killed_after_...`.)
#[tokio::test]
async fn a_redelivery_that_finds_no_order_of_the_job_is_checked_like_a_first_run() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut l = no_limits(user);
    l.kill_switch = true;
    app.store.upsert_risk_limits(&l).await.unwrap();
    let id = app.enqueue(&buy_sol(&secret)).await;
    // Its first delivery started (attempt 1) and died before reaching the broker.
    sqlx::query(
        "INSERT INTO jobs (job_id, user_id, partition, entry_id, exchange, action, symbol, alert,
           status, attempts, accepted_at, started_at)
         VALUES ($1, $2, 0, '0-0', 'paper', 'buy', 'SOLUSDT', '{}', 'executing', 1, now(), now())",
    )
    .bind(id)
    .bind(user)
    .execute(&app.store.pool)
    .await
    .unwrap();
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.attempts, 2, "a redelivery: {job:?}");
    assert_blocked(&job, "kill_switch");
    assert!(app.trades(user).await.is_empty(), "no order sent");
    assert!(app.position(user, "SOLUSDT").await.is_none());
    app.cleanup().await;
}

#[tokio::test]
async fn risk_kill_switch() {
    rule_blocks_opens_not_closes("kill_switch", |l| l.kill_switch = true, nothing).await;
}

#[tokio::test]
async fn risk_max_open_positions() {
    rule_blocks_opens_not_closes(
        "max_open_positions",
        |l| l.max_open_positions = Some(1),
        nothing,
    )
    .await;
}

#[tokio::test]
async fn risk_max_position_usd() {
    // 100 USD of SOLUSDT at 150 = 0.66 = 99 USD
    rule_blocks_opens_not_closes(
        "max_position_usd",
        |l| l.max_position_usd = Some(dec!(50)),
        nothing,
    )
    .await;
}

#[tokio::test]
async fn risk_max_trades_per_day() {
    rule_blocks_opens_not_closes(
        "max_trades_per_day",
        |l| l.max_trades_per_day = Some(1),
        nothing,
    )
    .await;
}

#[tokio::test]
async fn risk_trading_hours() {
    let h = Utc::now().hour();
    let t = |h: u32| NaiveTime::from_hms_opt(h % 24, 0, 0).unwrap();
    rule_blocks_opens_not_closes(
        "trading_hours",
        |l| l.trading_hours = Some((t(h + 2), t(h + 3))),
        nothing,
    )
    .await;
}

#[tokio::test]
async fn risk_allow_and_deny_lists() {
    rule_blocks_opens_not_closes(
        "symbol_not_allowed",
        |l| l.allow_symbols = Some(vec!["ETHUSDT".into()]),
        nothing,
    )
    .await;
    rule_blocks_opens_not_closes(
        "symbol_denied",
        |l| l.deny_symbols = Some(vec!["SOLUSDT".into()]),
        nothing,
    )
    .await;
}

/// A realized loss of 150 today (the closing fill's PnL, as the order life cycle records it).
async fn lost_150(app: &TestApp, _: &str, user: Uuid, job: Uuid) {
    sqlx::query(
        "INSERT INTO trades (job_id, user_id, exchange, symbol, leg, side, quantity, price, client_order_id, status, pnl)
         VALUES ($1, $2, 'paper', 'BTCUSDT', 'sl', 'sell', 1, 1, 'x', 'filled', -150)",
    )
    .bind(job)
    .bind(user)
    .execute(&app.store.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn risk_max_daily_loss() {
    rule_blocks_opens_not_closes(
        "max_daily_loss",
        |l| l.max_daily_loss = Some(dec!(100)),
        lost_150,
    )
    .await;
}

#[tokio::test]
async fn risk_max_daily_loss_is_unevaluable_without_the_realized_pnl_of_a_close() {
    let app = TestApp::spawn().await;
    let (user, secret, _) = user_with_a_long(&app).await;
    let close = app
        .run_one(&order(&secret, "paper", "close", "ETHUSDT", json!({})))
        .await;
    assert_eq!(close.status, JobStatus::Succeeded);
    // Closes record their PnL (paper: 0, the price does not move); a close whose PnL is unknown
    // (a broker that reported no fill price) makes the day's loss unknown.
    let recorded: Option<Decimal> =
        sqlx::query_scalar("SELECT pnl FROM trades WHERE job_id = $1 AND leg = 'close'")
            .bind(close.job_id)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(recorded, Some(Decimal::ZERO));
    sqlx::query("UPDATE trades SET pnl = NULL WHERE job_id = $1")
        .bind(close.job_id)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let mut l = no_limits(user);
    l.max_daily_loss = Some(dec!(100));
    app.store.upsert_risk_limits(&l).await.unwrap();
    let job = app.run_one(&buy_sol(&secret)).await;
    assert_blocked(&job, "max_daily_loss");
    assert!(
        job.error.as_deref().unwrap().contains("no realized PnL"),
        "{job:?}"
    );
    // once the close has its PnL (a gain), the rule evaluates and lets the open through
    sqlx::query("UPDATE trades SET pnl = 12.5 WHERE job_id = $1")
        .bind(close.job_id)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "buy",
            "SOLUSDT",
            json!({"position_size_usd": 100, "alert_id": "again"}),
        ))
        .await;
    assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
    app.cleanup().await;
}

/// A blocked reversal on sandbox credentials records its close in the sandbox account: the close
/// trade says `sandbox` and the sandbox position is the one closed (a blocked outcome used to keep
/// the default environment, `production`).
#[tokio::test]
async fn a_blocked_reversal_closes_the_position_of_its_own_environment() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.create_user().await;
    app.store
        .upsert_credentials(&sparky::store::CredentialRow {
            user_id: user,
            exchange: "paper".into(),
            api_key: "k".into(),
            api_secret: "s".into(),
            account_id: None,
            environment: "sandbox".into(),
            extra_config: json!({}),
            label: None,
        })
        .await
        .unwrap();
    let sandbox = json!({"position_size_usd": 100, "environment": "sandbox"});
    let long = app
        .run_one(&order(&secret, "paper", "buy", "ETHUSDT", sandbox.clone()))
        .await;
    assert_eq!(long.status, JobStatus::Succeeded, "{long:?}");
    let mut l = no_limits(user);
    l.kill_switch = true;
    app.store.upsert_risk_limits(&l).await.unwrap();
    let job = app
        .run_one(&order(&secret, "paper", "sell", "ETHUSDT", sandbox))
        .await;
    assert_blocked(&job, "kill_switch");
    let environments: Vec<String> =
        sqlx::query_scalar("SELECT environment FROM trades WHERE job_id = $1")
            .bind(job.job_id)
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(environments, vec!["sandbox"], "the close, in sandbox");
    let positions: i64 = sqlx::query_scalar("SELECT count(*) FROM positions WHERE user_id = $1")
        .bind(user)
        .fetch_one(&app.store.pool)
        .await
        .unwrap();
    assert_eq!(positions, 0, "the sandbox long is closed");
    app.cleanup().await;
}

#[tokio::test]
async fn risk_cooldown_blocks_the_open_of_a_reversal_but_closes() {
    let app = TestApp::spawn().await;
    let (user, secret, _) = user_with_a_long(&app).await;
    let mut l = no_limits(user);
    l.cooldown_secs = Some(3600);
    app.store.upsert_risk_limits(&l).await.unwrap();
    // a sell while long: the short is blocked (the ETHUSDT open was seconds ago), the long closed
    let job = app
        .run_one(&order(
            &secret,
            "paper",
            "sell",
            "ETHUSDT",
            json!({"position_size_usd": 100}),
        ))
        .await;
    assert_blocked(&job, "cooldown");
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("the long position was closed"),
        "{job:?}"
    );
    assert!(app.position(user, "ETHUSDT").await.is_none());
    let legs: Vec<String> = app
        .trades(user)
        .await
        .into_iter()
        .filter(|t| t.job_id == job.job_id)
        .map(|t| t.leg)
        .collect();
    assert_eq!(legs, vec!["close"]);
    // another symbol has no cooldown
    let other = app.run_one(&buy_sol(&secret)).await;
    assert_eq!(other.status, JobStatus::Succeeded);
    app.cleanup().await;
}

#[tokio::test]
async fn risk_breaker_after_consecutive_failures() {
    rule_blocks_opens_not_closes(
        "breaker",
        |l| l.max_consecutive_failures = Some(2),
        async |app: &TestApp, secret: &str, _, _| {
            // two rejected jobs in a row (limits the paper exchange cannot fill)
            for i in 0..2 {
                let job = app.run_one(&order(secret, "paper", "buy", "BTCUSDT", json!({"order_type": "limit", "price": 1, "position_size_usd": 100, "alert_id": format!("f{i}")})),
                )
                .await;
                assert_eq!(job.status, JobStatus::Rejected);
            }
        },
    )
    .await;
}

#[tokio::test]
async fn risk_breaker_counts_jobs_in_the_order_they_started_and_a_reset_only_later_ones() {
    let app = TestApp::spawn().await;
    let (user, secret, _) = user_with_a_long(&app).await;
    let mut l = no_limits(user);
    l.max_consecutive_failures = Some(2);
    app.store.upsert_risk_limits(&l).await.unwrap();
    let reject = |i: u32| {
        order(
            &secret,
            "paper",
            "buy",
            "BTCUSDT",
            json!({"order_type": "limit", "price": 1, "position_size_usd": 100, "alert_id": format!("r{i}")}),
        )
    };
    let open = |i: u32| {
        order(
            &secret,
            "paper",
            "buy",
            &format!("X{i}USDT"), // a new position each time
            json!({"position_size_usd": 100, "alert_id": format!("o{i}")}),
        )
    };
    for i in 0..2 {
        assert_eq!(app.run_one(&reject(i)).await.status, JobStatus::Rejected);
    }
    assert_blocked(&app.run_one(&open(0)).await, "breaker");

    // Re-armed: the failures before the reset no longer count.
    l.breaker_reset_at = Some(chrono::Utc::now());
    app.store.upsert_risk_limits(&l).await.unwrap();
    assert_eq!(app.run_one(&open(1)).await.status, JobStatus::Succeeded);
    // One failure after a success: the last two are not both failures.
    assert_eq!(app.run_one(&reject(2)).await.status, JobStatus::Rejected);
    assert_eq!(app.run_one(&open(2)).await.status, JobStatus::Succeeded);
    // A second one in a row trips it again.
    assert_eq!(app.run_one(&reject(3)).await.status, JobStatus::Rejected);
    assert_eq!(app.run_one(&reject(4)).await.status, JobStatus::Rejected);
    assert_blocked(&app.run_one(&open(3)).await, "breaker");
    app.cleanup().await;
}

#[tokio::test]
async fn risk_disabled_strategy_blocks_its_opens_only() {
    let app = TestApp::spawn().await;
    let (user, secret, _) = user_with_a_long(&app).await;
    let mut s = strategy(user, "swing", Some(ExchangeKind::Paper), dec!(100));
    s.enabled = false;
    app.store.upsert_strategy(&s).await.unwrap();
    let job = app
        .run_one(
            &json!({"secret": secret, "strategy": "swing", "action": "buy", "symbol": "SOLUSDT"}),
        )
        .await;
    assert_blocked(&job, "strategy_disabled");
    let close = app
        .run_one(
            &json!({"secret": secret, "strategy": "swing", "action": "close", "symbol": "ETHUSDT"}),
        )
        .await;
    assert_eq!(close.status, JobStatus::Succeeded);
    app.cleanup().await;
}

#[tokio::test]
async fn risk_limits_per_strategy_count_that_strategys_jobs() {
    let app = TestApp::spawn().await;
    let (user, secret, _) = user_with_a_long(&app).await; // no strategy
    app.store
        .upsert_strategy(&strategy(user, "a", Some(ExchangeKind::Paper), dec!(100)))
        .await
        .unwrap();
    let mut l = no_limits(user);
    l.strategy = Some("a".into());
    l.max_open_positions = Some(1);
    app.store.upsert_risk_limits(&l).await.unwrap();
    // strategy a has no position yet: its first open is allowed, its second blocked
    let first = app
        .run_one(&json!({"secret": secret, "strategy": "a", "action": "buy", "symbol": "SOLUSDT"}))
        .await;
    assert_eq!(first.status, JobStatus::Succeeded, "{first:?}");
    let second = app
        .run_one(&json!({"secret": secret, "strategy": "a", "action": "buy", "symbol": "BTCUSDT"}))
        .await;
    assert_blocked(&second, "max_open_positions");
    // jobs without the strategy are not limited by its row
    let free = app
        .run_one(&order(
            &secret,
            "paper",
            "buy",
            "AAPL",
            json!({"position_size_usd": 1000}),
        ))
        .await;
    assert_eq!(free.status, JobStatus::Succeeded);
    app.cleanup().await;
}

#[tokio::test]
async fn risk_max_position_usd_is_unevaluable_when_the_equity_is_unreadable() {
    let (fake, app, user, secret) = aster_app_with(|_| {}).await;
    let mut l = no_limits(user);
    l.max_position_usd = Some(dec!(1000));
    app.store.upsert_risk_limits(&l).await.unwrap();
    let ok = app
        .run_one(&order(
            &secret,
            "aster",
            "buy",
            "ETHUSDT",
            json!({"percent_of_equity": 1}),
        ))
        .await;
    assert_eq!(ok.status, JobStatus::Succeeded, "{ok:?}");
    let close = app
        .run_one(&order(&secret, "aster", "close", "ETHUSDT", json!({})))
        .await;
    assert_eq!(close.status, JobStatus::Succeeded, "{close:?}");
    fake.st.lock().unwrap().equity = None;
    let before = fake.st.lock().unwrap().orders.len();
    let job = app
        .run_one(&order(
            &secret,
            "aster",
            "buy",
            "ETHUSDT",
            json!({"percent_of_equity": 1, "alert_id": "no-equity"}),
        ))
        .await;
    assert_blocked(&job, "max_position_usd");
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("equity is unreadable"),
        "{job:?}"
    );
    assert_eq!(fake.st.lock().unwrap().orders.len(), before, "nothing sent");
    // visible in the job API and the metrics
    let v: Value = app
        .http
        .get(app.url(&format!("/v1/jobs/{}", job.job_id)))
        .header("X-Sparky-Secret", &secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["status"].as_str(), v["error_class"].as_str()),
        (Some("blocked"), Some("risk")),
        "{v}"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("sparky_jobs_blocked_total")
                && l.contains("rule=\"max_position_usd\"")
                && l.contains(&app.config.namespace)),
        "{metrics}"
    );
    app.cleanup().await;
}

/// The start of an opening job reads the limits that apply to it (the user's row and its
/// strategy's, not another strategy's) in the same statement, so the risk check needs no read of
/// its own; a close reads none. With `risk_limits` unreadable the start still succeeds without
/// them (the check then reads and blocks, see `rule_blocks_opens_not_closes`).
#[tokio::test]
async fn the_start_of_an_opening_job_reads_the_limits_that_apply_to_it() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut rows = vec![no_limits(user)];
    for name in ["a", "b"] {
        app.store
            .upsert_strategy(&strategy(user, name, Some(ExchangeKind::Paper), dec!(100)))
            .await
            .unwrap();
        let mut l = no_limits(user);
        l.strategy = Some(name.into());
        l.max_open_positions = Some(2);
        rows.push(l);
    }
    rows[0].kill_switch = true;
    for l in &rows {
        app.store.upsert_risk_limits(l).await.unwrap();
    }
    let job = |action: &str, strategy: Option<&str>| {
        paper_job(user, &secret, action, strategy, "SOLUSDT")
    };
    let begin = |job: sparky::domain::Job| {
        let store = app.store.clone();
        async move { store.begin_job(&job, 0, "0-1").await.unwrap() }
    };
    let with_a = begin(job("buy", Some("a"))).await;
    let Begin::Execute {
        attempt: 1,
        limits: Some(read),
    } = with_a
    else {
        panic!("{with_a:?}")
    };
    assert_eq!(read, vec![rows[0].clone(), rows[1].clone()]);
    let plain = begin(job("sell", None)).await;
    assert_eq!(
        plain,
        Begin::Execute {
            attempt: 1,
            limits: Some(vec![rows[0].clone()])
        }
    );
    let close = begin(job("close", Some("a"))).await;
    assert_eq!(
        close,
        Begin::Execute {
            attempt: 1,
            limits: None
        }
    );

    sqlx::query("ALTER TABLE risk_limits RENAME TO risk_limits_gone")
        .execute(&app.store.pool)
        .await
        .unwrap();
    let unreadable = begin(job("buy", None)).await;
    assert_eq!(
        unreadable,
        Begin::Execute {
            attempt: 1,
            limits: None
        }
    );
    app.cleanup().await;
}

/// A paper job of `user` (as its start sees it, not enqueued): `action` of $100 of `symbol`,
/// under `strategy` if any.
fn paper_job(
    user: Uuid,
    secret: &str,
    action: &str,
    strategy: Option<&str>,
    symbol: &str,
) -> sparky::domain::Job {
    let mut body = order(
        secret,
        "paper",
        action,
        symbol,
        json!({"user_id": user, "position_size_usd": 100}),
    );
    if let Some(s) = strategy {
        body["strategy"] = json!(s);
    }
    sparky::domain::Job {
        job_id: Uuid::now_v7(),
        accepted_at: Utc::now(),
        alert: sparky::domain::parse_alert(body.as_object().unwrap(), None).unwrap(),
    }
}

/// Starts written together ([`sparky::store::Begins`]) answer each job exactly what its own
/// `Store::begin_job` answers: the same attempts (two deliveries of one job in one wave included),
/// the same limits for opening jobs and none for a close, `Finished` for a final job; and a job
/// whose data Postgres refuses fails its own start only, the others' starts written once.
#[tokio::test]
async fn starts_written_together_answer_what_each_start_alone_answers() {
    use sparky::domain::Job;
    use sparky::store::Begins;
    use std::sync::atomic::Ordering::Relaxed;

    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    app.store
        .upsert_strategy(&strategy(user, "a", Some(ExchangeKind::Paper), dec!(100)))
        .await
        .unwrap();
    let mut user_row = no_limits(user);
    user_row.max_open_positions = Some(3);
    let mut a_row = no_limits(user);
    a_row.strategy = Some("a".into());
    a_row.max_trades_per_day = Some(9);
    // Another user with limits of their own: each job must get its own user's.
    let (other, _) = app.paper_user().await;
    let mut other_row = no_limits(other);
    other_row.max_open_positions = Some(7);
    for l in [&user_row, &a_row, &other_row] {
        app.store.upsert_risk_limits(l).await.unwrap();
    }
    let job = |action: &str, strategy: Option<&str>, symbol: &str| {
        paper_job(user, &secret, action, strategy, symbol)
    };
    // One wave: the deliveries, in the order they reach their begin.
    let wave = |bad: bool| {
        let twice = job("buy", None, "ETHUSDT");
        let finished = job("sell", Some("a"), "BTCUSDT");
        let mut others = job("buy", Some("a"), "XRPUSDT");
        others.alert.user_id = other;
        let mut v = vec![
            job("buy", Some("a"), "SOLUSDT"),
            others,
            job("sell", None, "SOLUSDT"),
            job("close", Some("a"), "SOLUSDT"),
            twice.clone(),
            finished.clone(),
            twice,
        ];
        if bad {
            // Postgres refuses a NUL in text and in jsonb (SQLSTATE 22021, 22P05).
            let mut refused = job("buy", Some("a"), "SOLUSDT");
            refused.alert.strategy = Some("a\u{0}b".into());
            v.insert(2, refused);
        }
        (v, finished)
    };
    let finish = |j: Job| {
        let app = &app;
        async move {
            app.store.begin_job(&j, 0, "0-1").await.unwrap();
            sqlx::query("UPDATE jobs SET status = 'succeeded' WHERE job_id = $1")
                .bind(j.job_id)
                .execute(&app.store.pool)
                .await
                .unwrap();
        }
    };
    let begins = Begins::new(app.store.clone());
    for bad in [false, true] {
        // Alone: one after another, as a single lane would.
        let (alone, finished) = wave(bad);
        finish(finished).await;
        let mut expected = Vec::new();
        for j in &alone {
            expected.push(app.store.begin_job(j, 0, "0-1").await);
        }
        // Together: every delivery of the twin wave reaches its begin at once.
        let (together, finished) = wave(bad);
        finish(finished).await;
        let statements = begins.stats().statements.load(Relaxed);
        let mut got =
            futures::future::join_all(together.iter().map(|j| begins.begin(j, 0, "0-1"))).await;
        // The two deliveries of one job are concurrent: which is recorded first is not given
        // (after a failed statement the first starts alone while the second is in the next one).
        let attempt = |b: &Result<Begin, _>| match b {
            Ok(Begin::Execute { attempt, .. }) => *attempt,
            other => panic!("{other:?}"),
        };
        let (first, second) = (together.len() - 3, together.len() - 1);
        if attempt(&got[first]) > attempt(&got[second]) {
            got.swap(first, second);
        }
        for (i, (want, got)) in expected.iter().zip(&got).enumerate() {
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "delivery {i} (bad wave: {bad})"),
                (Err(w), Err(g)) => {
                    assert!(w.is_data_error() && g.is_data_error(), "{w} / {g}")
                }
                _ => panic!("delivery {i} (bad wave: {bad}): alone {want:?}, together {got:?}"),
            }
        }
        assert_eq!(
            got[1].as_ref().unwrap(),
            &Begin::Execute {
                attempt: 1,
                limits: Some(vec![other_row.clone()])
            },
            "the other user's job reads that user's limits"
        );
        assert!(
            matches!(got.last(), Some(Ok(Begin::Execute { attempt: 2, .. }))),
            "the second delivery of a job is its second attempt: {got:?}"
        );
        let ran = begins.stats().statements.load(Relaxed) - statements;
        if !bad {
            assert!(
                ran < together.len() as u64,
                "{ran} statements for {} starts",
                together.len()
            );
        } else {
            assert!(
                begins.stats().alone.load(Relaxed) >= 1,
                "the failed statement's jobs started alone"
            );
        }
    }
    // Each good job of the waves was started exactly as often as it was delivered: a failed
    // statement wrote nothing.
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT attempts FROM jobs WHERE status = 'executing' ORDER BY attempts",
    )
    .fetch_all(&app.store.pool)
    .await
    .unwrap();
    assert_eq!(
        attempts.iter().filter(|a| **a == 2).count(),
        4,
        "{attempts:?}"
    );
    assert!(attempts.iter().all(|a| *a <= 2), "{attempts:?}");
    app.cleanup().await;
}

/// A paper job's first delivery writes its start with its commit (`worker::job::Start`): one
/// statement. When the job already has a row (here: a delivery that began it and died, and a
/// duplicate entry of a job that finished), that statement writes nothing and the delivery takes
/// the usual path, so the job is recorded exactly once.
#[tokio::test]
async fn a_paper_first_delivery_records_its_start_with_its_commit_unless_the_job_has_a_row() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let fresh = paper_job(user, &secret, "buy", None, "SOLUSDT");
    let begun = paper_job(user, &secret, "buy", None, "ETHUSDT");
    let poisoned = paper_job(user, &secret, "buy", None, "BTCUSDT");
    for job in [&fresh, &begun, &poisoned] {
        app.queue.enqueue(job).await.unwrap();
    }
    // `begun` was started by a delivery that died (as a previous owner's late begin would);
    // `poisoned` by as many as `SPARKY_MAX_DELIVERIES`.
    let p = app.queue.partition_of(&user);
    app.store.begin_job(&begun, p, "0-1").await.unwrap();
    for _ in 0..app.config.max_deliveries {
        app.store.begin_job(&poisoned, p, "0-2").await.unwrap();
    }
    app.run_worker_until_idle().await;
    // The delivery that found those starts counts too: one more than the limit, so it is poison.
    let row = app.job(poisoned.job_id).await;
    assert_eq!(
        (row.status, row.error_class),
        (JobStatus::Dead, Some(FailureClass::Poison)),
        "{row:?}"
    );

    let row = app.job(fresh.job_id).await;
    assert_eq!(
        (row.status, row.attempts),
        (JobStatus::Succeeded, 1),
        "{row:?}"
    );
    let (started, finished) = (row.started_at.unwrap(), row.finished_at.unwrap());
    assert!(started <= finished && row.accepted_at <= started, "{row:?}");
    assert_ne!(row.entry_id, "0-1");
    let row = app.job(begun.job_id).await;
    assert_eq!(
        (row.status, row.attempts),
        (JobStatus::Succeeded, 2),
        "the start that was there counts: {row:?}"
    );
    assert_eq!(app.trades(user).await.len(), 2, "one trade per job run");
    assert_eq!(
        starts_recorded(&app),
        2.0,
        "only the deliveries whose commit found a row"
    );

    // The finished job's entry appended again (a duplicate): read as a first delivery, it finds
    // the job's row and records nothing.
    app.queue.enqueue(&fresh).await.unwrap();
    app.run_worker_until_idle().await;
    let row = app.job(fresh.job_id).await;
    assert_eq!(
        (row.status, row.attempts),
        (JobStatus::Succeeded, 1),
        "{row:?}"
    );
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 2, "nothing recorded twice");
    let sol = trades.iter().find(|t| t.symbol == "SOLUSDT").unwrap();
    assert_eq!(
        app.position(user, "SOLUSDT").await.map(|p| p.quantity),
        Some(sol.quantity),
        "the position holds the one open"
    );
    assert!(app.pending_entries(p).await.is_empty(), "every entry acked");
    assert_eq!(
        starts_recorded(&app),
        3.0,
        "and the duplicate's, after its commit found the row"
    );
    app.cleanup().await;
}

/// Paper deliveries of `app`'s workers that recorded their start before executing (the `start`
/// phase of `sparky_job_phase_seconds`).
fn starts_recorded(app: &TestApp) -> f64 {
    let text = sparky::metrics::install().expect("recorder").render();
    metric(
        &text,
        &app.config.namespace,
        "sparky_job_phase_seconds_count",
        &[("exchange", "paper"), ("phase", "start")],
    )
}

/// Limits Postgres stores but Sparky cannot decode (`NaN` passes `CHECK (max_position_usd > 0)`):
/// the start, already committed, does not run again (one attempt, so the job is not taken for a
/// redelivery that skips the check), and the check reads them itself and blocks the open.
#[tokio::test]
async fn limits_that_do_not_decode_block_the_open_after_one_start() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    app.store
        .upsert_risk_limits(&no_limits(user))
        .await
        .unwrap();
    sqlx::query("UPDATE risk_limits SET max_position_usd = 'NaN' WHERE user_id = $1")
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let job = app.run_one(&buy_sol(&secret)).await;
    assert_unevaluable(&job);
    assert_eq!(job.attempts, 1, "{job:?}");
    app.cleanup().await;
}
