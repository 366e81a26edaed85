//! The ingress contract: every field rule and every answer.

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn bad_inputs_get_the_right_answer_and_enqueue_nothing() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let (other_user, other_secret) = app.paper_user().await;
    let good = alert(user, &secret, "buy");
    let with = |k: &str, v: Value| {
        let mut b = good.clone();
        b[k] = v;
        b
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        b
    };
    // (case, body, expected status, field that must be named)
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "user_id not a uuid",
            with("user_id", json!("bob")),
            StatusCode::BAD_REQUEST,
            "user_id",
        ),
        (
            "user_id wrong type",
            with("user_id", json!([1])),
            StatusCode::BAD_REQUEST,
            "user_id",
        ),
        (
            "missing exchange",
            without("exchange"),
            StatusCode::BAD_REQUEST,
            "exchange",
        ),
        (
            "unknown exchange",
            with("exchange", json!("kraken")),
            StatusCode::BAD_REQUEST,
            "exchange",
        ),
        (
            "missing action",
            without("action"),
            StatusCode::BAD_REQUEST,
            "action",
        ),
        (
            "unknown action",
            with("action", json!("hold")),
            StatusCode::BAD_REQUEST,
            "action",
        ),
        (
            "action wrong type",
            with("action", json!(true)),
            StatusCode::BAD_REQUEST,
            "action",
        ),
        (
            "missing symbol",
            without("symbol"),
            StatusCode::BAD_REQUEST,
            "symbol",
        ),
        (
            "bad symbol",
            with("symbol", json!("ETH USDT!")),
            StatusCode::BAD_REQUEST,
            "symbol",
        ),
        (
            "missing size",
            without("position_size_usd"),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "blank size (an empty TradingView placeholder)",
            with("position_size_usd", json!("")),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "limit with a blank price",
            {
                let mut b = with("order_type", json!("limit"));
                b["price"] = json!(" ");
                b
            },
            StatusCode::BAD_REQUEST,
            "price",
        ),
        (
            "zero size",
            with("position_size_usd", json!(0)),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "negative size",
            with("position_size_usd", json!("-5")),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "size not a number",
            with("position_size_usd", json!("lots")),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "size wrong type",
            with("position_size_usd", json!({"usd": 1})),
            StatusCode::BAD_REQUEST,
            "position_size_usd",
        ),
        (
            "limit without price",
            with("order_type", json!("limit")),
            StatusCode::BAD_REQUEST,
            "price",
        ),
        (
            "unknown order type",
            with("order_type", json!("stop")),
            StatusCode::BAD_REQUEST,
            "order_type",
        ),
        (
            "negative price",
            with("price", json!(-1)),
            StatusCode::BAD_REQUEST,
            "price",
        ),
        (
            "stop loss 100%",
            with("stop_loss_percent", json!(100)),
            StatusCode::BAD_REQUEST,
            "stop_loss_percent",
        ),
        (
            "take profit 0",
            with("take_profit_percent", json!("0")),
            StatusCode::BAD_REQUEST,
            "take_profit_percent",
        ),
        (
            "bad timestamp",
            with("timestamp", json!("noon")),
            StatusCode::BAD_REQUEST,
            "timestamp",
        ),
        (
            "bad environment",
            with("environment", json!("staging")),
            StatusCode::BAD_REQUEST,
            "environment",
        ),
        (
            "missing secret",
            without("secret"),
            StatusCode::UNAUTHORIZED,
            "",
        ),
        (
            "wrong secret, same length",
            with("secret", json!(format!("sk_{}", "0".repeat(64)))),
            StatusCode::UNAUTHORIZED,
            "",
        ),
        (
            "wrong secret, other length",
            with("secret", json!("nope")),
            StatusCode::UNAUTHORIZED,
            "",
        ),
        (
            "secret of another user",
            with("secret", json!(other_secret)),
            StatusCode::UNAUTHORIZED,
            "",
        ),
        (
            "own secret, other user's id",
            with("user_id", json!(other_user)),
            StatusCode::UNAUTHORIZED,
            "",
        ),
    ];
    for (case, body, status, field) in cases {
        let (got, v) = app.post_webhook(&body).await;
        assert_eq!(got, status, "{case}: {v}");
        if !field.is_empty() {
            let named: Vec<&str> = v["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            assert!(named.contains(&field), "{case}: {field} not named in {v}");
            assert!(v["error"].as_str().unwrap().contains(field), "{case}: {v}");
            assert!(v["field"].is_string(), "{case}: {v}");
        } else {
            assert!(v["error"].is_string(), "{case}: {v}");
        }
    }

    // Several problems at once: all named.
    let (got, v) = app
        .post_webhook(&json!({"secret": secret, "user_id": user, "exchange": "x", "action": "y"}))
        .await;
    assert_eq!(got, StatusCode::BAD_REQUEST);
    let named: Vec<&str> = v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    for f in ["exchange", "action", "symbol"] {
        assert!(named.contains(&f), "{f} not in {v}");
    }

    // Not JSON, not an object, too large.
    for (case, raw, status) in [
        ("not json", b"buy ETH now".to_vec(), StatusCode::BAD_REQUEST),
        ("json array", b"[1,2]".to_vec(), StatusCode::BAD_REQUEST),
        ("empty", Vec::new(), StatusCode::BAD_REQUEST),
        (
            "oversized",
            vec![b' '; 64 * 1024 + 1],
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ] {
        let (got, v) = app.post_raw(raw, &[]).await;
        assert_eq!(got, status, "{case}");
        assert_eq!(v["field"], "body", "{case}: {v}");
    }

    assert_eq!(app.queued_entries().await, 0, "nothing was enqueued");
    app.cleanup().await;
}

#[tokio::test]
async fn accepted_forms_of_a_webhook() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;

    // text/plain (TradingView), aliases, numeric strings, secret in a header.
    let body = json!({"user_id": user, "exchange": "PAPER", "action": "long",
                      "symbol": "ethusdt", "position_size_usd": "100.50"});
    let r = app
        .http
        .post(app.url("/webhook"))
        .header("content-type", "text/plain")
        .header("X-Sparky-Secret", &secret)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "queued");
    assert!(v["partition"].as_u64().unwrap() < 4);
    assert_eq!(app.queued_entries().await, 1);

    // The same alert_id again: the first job's id, 200 duplicate, nothing more enqueued.
    let mut b = alert(user, &secret, "sell");
    b["alert_id"] = json!("tv-123");
    let (s1, v1) = app.post_webhook(&b).await;
    assert_eq!(s1, StatusCode::ACCEPTED);
    let (s2, v2) = app.post_webhook(&b).await;
    assert_eq!(s2, StatusCode::OK);
    assert_eq!(v2["status"], "duplicate");
    assert_eq!(v2["job_id"], v1["job_id"]);
    assert_eq!(app.queued_entries().await, 2);
    app.cleanup().await;
}

#[tokio::test]
async fn the_same_alert_id_with_a_different_alert_is_409_naming_the_first_job() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut first = alert(user, &secret, "buy");
    first["alert_id"] = json!("tv-static");
    let (s1, v1) = app.post_webhook(&first).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{v1}");
    let job = v1["job_id"].clone();

    // The same alert spelled differently (alias, case, prefix, numeric string, extra field, the
    // secret in the header): the same alert, a duplicate.
    let respelled = json!({"user_id": user, "exchange": "PAPER", "action": "long",
        "symbol": "ethusdt", "order_type": "MARKET", "position_size_usd": "100.0",
        "alert_id": "tv-static", "comment": "not part of the alert"});
    let r = app
        .http
        .post(app.url("/webhook"))
        .header("X-Sparky-Secret", &secret)
        .json(&respelled)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["status"].as_str(), &v["job_id"]),
        (Some("duplicate"), &job)
    );

    // A different alert under the same key (a template with a static alert_id): 409 naming the
    // first job, nothing enqueued. Also with the key in the Idempotency-Key header.
    let mut reversed = alert(user, &secret, "sell");
    reversed["alert_id"] = json!("tv-static");
    let mut bigger = alert(user, &secret, "buy");
    bigger["position_size_usd"] = json!(250);
    let with_header = |body: &Value| {
        app.http
            .post(app.url("/webhook"))
            .header("Idempotency-Key", "tv-static")
            .json(body)
            .send()
    };
    for r in [
        app.http
            .post(app.url("/webhook"))
            .json(&reversed)
            .send()
            .await
            .unwrap(),
        with_header(&bigger).await.unwrap(),
    ] {
        assert_eq!(r.status(), StatusCode::CONFLICT);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["job_id"], job, "{v}");
        assert!(v["error"].as_str().unwrap().contains("alert_id"), "{v}");
    }
    // The original alert with the key in the header is still the duplicate.
    let r = with_header(&alert(user, &secret, "buy")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(app.queued_entries().await, 1);

    // Another key is another alert.
    reversed["alert_id"] = json!("tv-static-2");
    app.enqueue(&reversed).await;
    assert_eq!(app.queued_entries().await, 2);
    app.cleanup().await;
}

/// A look-up the ingress needs before it can enqueue (the secret's owner, the alert's strategy)
/// that Postgres fails is `503` with `Retry-After` saying nothing was accepted, so a sender can
/// safely follow it; following it once Postgres answers again is accepted, once. (Postgres refusing
/// the table stands in for Postgres down: the ingress cannot tell them apart.)
#[tokio::test]
async fn a_failed_secret_or_strategy_look_up_is_503_with_retry_after_and_nothing_accepted() {
    let app = TestApp::spawn().await;
    let (known, known_secret) = app.paper_user().await;
    let (fresh, fresh_secret) = app.paper_user().await;
    // `known`'s secret (and its default strategy) are cached by this first alert.
    app.enqueue(&alert(known, &known_secret, "buy")).await;
    let before = app.queued_entries().await;
    let rename = |from: &'static str, to: &'static str| {
        let pool = app.store.pool.clone();
        async move {
            sqlx::query(&format!("ALTER TABLE {from} RENAME TO {to}"))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    let mut named = alert(known, &known_secret, "buy");
    named["strategy_id"] = json!("trend");
    rename("strategies", "strategies_gone").await;
    rename("webhook_secrets", "webhook_secrets_gone").await;
    for (what, body, says) in [
        (
            "an uncached secret",
            alert(fresh, &fresh_secret, "buy"),
            "cannot verify the webhook secret",
        ),
        (
            "a cached secret naming an uncached strategy",
            named.clone(),
            "cannot read the alert's strategy",
        ),
    ] {
        let (status, retry_after, v) = app.post_webhook_answer(&body).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {v}");
        assert_eq!(retry_after, Some(1), "{what}: {v}");
        assert_eq!(v["retry_after_secs"], 1, "{what}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(e.contains(says), "{what}: {e}");
        assert!(e.contains("nothing was accepted"), "{what}: {e}");
    }
    assert_eq!(app.queued_entries().await, before, "nothing enqueued");
    let metrics = app.metrics_text().await;
    for reason in ["auth_unavailable", "strategy_unavailable"] {
        let counted = metric(
            &metrics,
            &app.config.namespace,
            "sparky_webhooks_rejected_total",
            &[("reason", reason)],
        );
        assert_eq!(counted, 1.0, "{reason} counted once");
    }

    // Postgres answers again: following Retry-After is accepted (the strategy does not exist: a
    // 400 naming it, as for any alert naming a strategy its user does not have).
    rename("strategies_gone", "strategies").await;
    rename("webhook_secrets_gone", "webhook_secrets").await;
    let (status, v) = app
        .post_webhook_honouring_retry_after(&alert(fresh, &fresh_secret, "buy"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let (status, v) = app.post_webhook_honouring_retry_after(&named).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "strategy_id", "{v}");
    assert_eq!(app.queued_entries().await, before + 1);
    app.cleanup().await;
}

#[tokio::test]
async fn redis_down_means_503_never_202() {
    let mut redis = PrivateRedis::start().await;
    let url = redis.url();
    let app = TestApp::spawn_with(|c| c.redis_url = url).await;
    let (user, secret) = app.paper_user().await;
    assert_eq!(
        app.enqueue(&alert(user, &secret, "buy"))
            .await
            .get_version_num(),
        7
    );

    redis.kill();
    for _ in 0..3 {
        let (status, v) = app.post_webhook(&alert(user, &secret, "buy")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        // A time-out may come after the append: the answer must not claim nothing was accepted.
        let e = v["error"].as_str().unwrap();
        assert!(e.contains("may or may not have been accepted"), "{e}");
        assert!(e.contains("same alert_id"), "{e}");
        assert!(!e.contains("nothing was accepted"), "{e}");
    }
    let r = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let r = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    app.cleanup().await;
}
