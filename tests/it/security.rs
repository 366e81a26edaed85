//! Security: secret rotation, credentials never in plaintext, key rotation, limits, source addresses,
//! and a property test of the webhook endpoint.

use std::time::{Duration, Instant};

use base64::Engine;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestCaseError, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Map, Value};
use sparky::credentials::{seal_row, CredentialLoader};
use sparky::domain::ExchangeKind;
use sparky::queue::{Queue, RateLimit};
use sparky::secrets::{generate_webhook_secret, hash_webhook_secret, key_id_of, MasterKey};
use sparky::store::{CredentialRow, Store};
use uuid::Uuid;

use crate::helpers::*;

fn new_key() -> MasterKey {
    MasterKey::from_base64(&MasterKey::generate_base64()).unwrap()
}

/// A second ingress over the same database and Redis namespace: its own connections and caches.
async fn second_ingress(app: &TestApp, config: &sparky::config::Config) -> std::net::SocketAddr {
    let store = Store::connect(&config.database_url, 4).await.unwrap();
    let queue = Queue::connect(
        &config.redis_url,
        &config.namespace,
        config.partitions,
        Duration::from_millis(1000),
    )
    .await
    .unwrap();
    spawn_ingress(config, store, queue, app.shutdown.clone()).await
}

async fn post(http: &reqwest::Client, url: String, body: &Value) -> reqwest::Response {
    http.post(url).json(body).send().await.unwrap()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

#[tokio::test]
async fn a_rotated_secret_stops_working_within_the_cache_ttl() {
    let ttl = Duration::from_secs(2);
    let app = TestApp::spawn_with(|c| c.secret_cache_ttl = ttl).await;
    let (user, old) = app.paper_user().await;
    let job = app.enqueue(&alert(user, &old, "buy")).await; // now cached in the ingress

    let new = generate_webhook_secret();
    app.store
        .rotate_secret(user, &hash_webhook_secret(new.expose()))
        .await
        .unwrap();
    let rotated_at = Instant::now();
    // The new secret works at once (it was never cached as unknown).
    app.enqueue(&alert(user, new.expose(), "close")).await;
    let before = app.queued_entries().await;
    loop {
        let (status, v) = app.post_webhook(&alert(user, &old, "close")).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        assert!(
            rotated_at.elapsed() < ttl + Duration::from_millis(500),
            "the old secret still worked {:?} after rotation (cache TTL {ttl:?})",
            rotated_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let accepted_meanwhile = app.queued_entries().await - before;
    assert!(rotated_at.elapsed() <= ttl + Duration::from_millis(500));
    // ... and keeps failing, for the job API too.
    let (status, _) = app.post_webhook(&alert(user, &old, "close")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{job}")))
        .header("X-Sparky-Secret", &old)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.queued_entries().await - before, accepted_meanwhile);
    app.enqueue(&alert(user, new.expose(), "close")).await;
    app.cleanup().await;
}

/// Every row of every table in the public schema, as text (covers every text and jsonb column).
async fn dump_postgres(store: &Store) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert!(tables.iter().any(|t| t == "bot_credentials"), "{tables:?}");
    let mut out = String::new();
    for t in tables {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(row_to_json(x)::text, E'\\n') FROM \"{t}\" x"
        ))
        .fetch_one(&store.pool)
        .await
        .unwrap();
        out.push_str(&format!("== {t}\n{}\n", rows.unwrap_or_default()));
    }
    out
}

/// Every key of the namespace with its whole value, whatever its type.
async fn dump_redis(queue: &Queue, ns: &str) -> (String, Vec<String>) {
    let mut c = queue.conn();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{ns}:*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let mut out = String::new();
    let mut types = vec![];
    for k in &keys {
        let ty: String = redis::cmd("TYPE").arg(k).query_async(&mut c).await.unwrap();
        let v: redis::Value = match ty.as_str() {
            "string" => redis::cmd("GET").arg(k).query_async(&mut c).await.unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(k)
                .query_async(&mut c)
                .await
                .unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(k)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
                .unwrap(),
            "set" => redis::cmd("SMEMBERS")
                .arg(k)
                .query_async(&mut c)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(k)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await
                .unwrap(),
            other => panic!("key {k} has type {other}, which this scan does not read"),
        };
        types.push(ty.clone());
        out.push_str(&format!("== {k} ({ty})\n{}\n", value_text(&v)));
    }
    (out, types)
}

fn value_text(v: &redis::Value) -> String {
    use redis::Value as V;
    match v {
        V::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        V::SimpleString(s) => s.clone(),
        V::VerbatimString { text, .. } => text.clone(),
        V::Int(i) => i.to_string(),
        V::Double(d) => d.to_string(),
        V::Array(items) | V::Set(items) => {
            items.iter().map(value_text).collect::<Vec<_>>().join("\n")
        }
        V::Map(kv) => kv
            .iter()
            .map(|(k, v)| format!("{}={}", value_text(k), value_text(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        V::Nil => String::new(),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn credential_markers_never_appear_in_plaintext_anywhere() {
    let key = new_key();
    let k = key.clone();
    let app = TestApp::spawn_with(move |c| c.master_key = Some(k)).await;
    let (user, secret) = app.create_user().await;
    let marker_key = format!("MARKERKEY{}", Uuid::new_v4().simple());
    let marker_secret = format!("MARKERSECRET{}", Uuid::new_v4().simple());
    let mut row = CredentialRow {
        user_id: user,
        exchange: "paper".into(),
        api_key: marker_key.clone(),
        api_secret: marker_secret.clone(),
        account_id: None,
        environment: "production".into(),
        extra_config: json!({}),
        label: Some("Main Account".into()),
    };
    seal_row(&mut row, Some(&key));
    app.store.upsert_credentials(&row).await.unwrap();

    // Trades of every kind: open, skip, reverse, close, a rejected one (below the minimum, so it
    // also reaches the dead-letter stream), one with an idempotency key, and a failed login.
    let mut jobs = vec![];
    for action in ["buy", "buy", "sell", "close"] {
        jobs.push(app.enqueue(&alert(user, &secret, action)).await);
    }
    let mut tiny = alert(user, &secret, "buy");
    tiny["position_size_usd"] = json!("0.0001");
    tiny["alert_id"] = json!("tv-alert-1");
    jobs.push(app.enqueue(&tiny).await);
    let (status, _) = app
        .post_webhook(&alert(user, "sk_wrong_secret_for_the_scan", "buy"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.run_worker_until_idle().await;
    let statuses: Vec<String> = {
        let mut v = vec![];
        for j in &jobs {
            v.push(app.job(*j).await.status);
        }
        v
    };
    assert_eq!(
        statuses,
        ["succeeded", "skipped", "succeeded", "succeeded", "rejected"],
        "the scenario ran"
    );
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{}", jobs[0])))
        .header("X-Sparky-Secret", &secret)
        .send()
        .await
        .unwrap();
    let api_answer = r.text().await.unwrap();

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut markers = vec![marker_key.clone(), marker_secret.clone(), secret.clone()];
    markers.push(b64.encode(&marker_key));
    markers.push(b64.encode(&marker_secret));

    let pg = dump_postgres(&app.store).await;
    let (redis, types) = dump_redis(&app.queue, &app.config.namespace).await;
    let logs = captured_logs();
    // The scans saw the data (so "not found" means something): the user, ciphertext, the cache, the
    // streams, the dead-letter stream, the worker's credential log lines.
    assert!(
        pg.contains(&user.to_string()) && pg.contains("enc:v1:"),
        "{pg}"
    );
    assert!(
        pg.contains(&hash_webhook_secret(&secret)),
        "only the hash is stored"
    );
    assert!(redis.contains(&user.to_string()), "{redis}");
    assert!(
        redis.contains(&format!("{}:cred:{user}", app.config.namespace))
            && redis.contains("enc:v1:"),
        "the credential cache was filled (with ciphertext): {redis}"
    );
    assert!(types.iter().any(|t| t == "stream") && types.iter().any(|t| t == "string"));
    assert!(
        redis.contains("rejected") || redis.contains("min"),
        "dlq entry: {redis}"
    );
    assert!(
        logs.contains("Loaded paper credentials"),
        "worker logs captured"
    );
    for m in &markers {
        assert!(!pg.contains(m.as_str()), "`{m}` in Postgres:\n{pg}");
        assert!(!redis.contains(m.as_str()), "`{m}` in Redis:\n{redis}");
        assert!(!logs.contains(m.as_str()), "`{m}` in the logs");
        assert!(!api_answer.contains(m.as_str()), "`{m}` in the job API");
    }
    // The stored values really are the markers, under the configured key.
    let loader = CredentialLoader::new(
        app.store.clone(),
        app.queue.clone(),
        Duration::from_secs(60),
        vec![key],
    );
    let c = loader
        .load(user, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.api_key.expose(), marker_key);
    assert!(!format!("{c:?}").contains(&marker_secret));
    app.cleanup().await;
}

#[tokio::test]
async fn rotate_key_reencrypts_every_row_under_the_current_key() {
    let old = new_key();
    let k = old.clone();
    let mut app = TestApp::spawn_with(move |c| c.master_key = Some(k)).await;
    let (a, a_secret) = app.paper_user().await; // under the old key
    let (b, _) = app.paper_user().await;
    let (legacy, legacy_secret) = app.create_user().await;
    sqlx::query(
        "INSERT INTO bot_credentials (user_id, exchange, api_key, api_secret, environment)
         VALUES ($1, 'paper', 'legacy-plain-key', 'legacy-plain-secret', 'production')",
    )
    .bind(legacy)
    .execute(&app.store.pool)
    .await
    .unwrap();
    // fill the credential cache with old ciphertext
    app.enqueue(&alert(a, &a_secret, "buy")).await;
    app.run_worker_until_idle().await;

    // The operator: SPARKY_MASTER_KEY=<new>, SPARKY_OLD_MASTER_KEYS=<old>, then rotate-key.
    let new = new_key();
    let mut config = app.config.clone();
    config.master_key = Some(new.clone().with_retired(vec![old.clone()]));
    let cli =
        <sparky::cli::Cli as clap::Parser>::try_parse_from(["sparky", "credentials", "rotate-key"])
            .unwrap();
    sparky::cli::run(cli, config.clone()).await.unwrap();

    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT api_key, api_secret FROM bot_credentials ORDER BY id")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 3);
    for (k, s) in &stored {
        assert_eq!(key_id_of(k), Some(new.id()), "{k}");
        assert_eq!(key_id_of(s), Some(new.id()), "{s}");
    }
    let cached: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:cred:*", app.config.namespace))
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    assert!(
        cached.is_empty(),
        "old ciphertext left in the cache: {cached:?}"
    );

    // The old key can now be dropped: everything opens with the new key alone.
    let only_new = CredentialLoader::new(
        app.store.clone(),
        app.queue.clone(),
        Duration::from_secs(60),
        vec![new.clone()],
    );
    for (u, want) in [
        (a, format!("secret-{a}")),
        (b, format!("secret-{b}")),
        (legacy, "legacy-plain-secret".to_string()),
    ] {
        let c = only_new
            .load(u, ExchangeKind::Paper, None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.api_secret.expose(), want);
    }
    // A second run has nothing to do.
    let again = sparky::cli::rotate_key(&app.store, &new).await.unwrap();
    assert_eq!(
        (again.rotated, again.current, again.failed.len()),
        (0, 3, 0)
    );

    // A worker configured with the new key only trades for the formerly plaintext user too.
    app.config.master_key = Some(new.clone());
    let job = app.enqueue(&alert(legacy, &legacy_secret, "buy")).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(job).await.status, "succeeded");

    // A row under a key that is not configured is reported by id, never by value, and left alone.
    let stranger = new_key();
    let (c, _) = app.create_user().await;
    let mut row = CredentialRow {
        user_id: c,
        exchange: "paper".into(),
        api_key: "stranger-key-value".into(),
        api_secret: "stranger-secret-value".into(),
        account_id: None,
        environment: "production".into(),
        extra_config: json!({}),
        label: None,
    };
    seal_row(&mut row, Some(&stranger));
    app.store.upsert_credentials(&row).await.unwrap();
    let cli =
        <sparky::cli::Cli as clap::Parser>::try_parse_from(["sparky", "credentials", "rotate-key"])
            .unwrap();
    let err = format!("{:#}", sparky::cli::run(cli, config).await.unwrap_err());
    assert!(
        err.contains("could not be re-encrypted") && err.contains(stranger.id()),
        "{err}"
    );
    assert!(!err.contains("stranger-"), "{err}");
    app.cleanup().await;
}

#[tokio::test]
async fn the_rate_limit_is_shared_by_two_ingress_processes_and_429_says_when_to_retry() {
    let limit = RateLimit {
        per_sec: 1.0,
        burst: 4,
    };
    let app = TestApp::spawn_with(|c| c.rate_limit = limit).await;
    let other = second_ingress(&app, &app.config).await;
    let (user, secret) = app.paper_user().await;
    let addrs = [app.addr, other];

    let started = Instant::now();
    let (mut accepted, mut limited) = (0u64, [0u32; 2]);
    for i in 0..16 {
        let r = post(
            &app.http,
            format!("http://{}/webhook", addrs[i % 2]),
            &alert(user, &secret, "buy"),
        )
        .await;
        match r.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited[i % 2] += 1;
                let secs = retry_after(&r);
                assert!((1..=2).contains(&secs), "Retry-After {secs}");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["retry_after_secs"], secs);
                assert!(v["error"].as_str().unwrap().contains("rate limit"), "{v}");
            }
            s => panic!("unexpected {s}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // One bucket for both: the burst plus what refilled meanwhile. Separate buckets per process
    // would have accepted at least 8.
    assert!(elapsed < 3.0, "too slow to tell ({elapsed} s)");
    let most = limit.burst as u64 + (elapsed * limit.per_sec).floor() as u64;
    assert!(
        (limit.burst as u64..=most).contains(&accepted),
        "{accepted} accepted in {elapsed} s"
    );
    assert!(limited[0] > 0 && limited[1] > 0, "{limited:?}");
    assert_eq!(
        app.queued_entries().await,
        accepted,
        "a 429 enqueues nothing"
    );

    // Per user: someone else is not affected.
    let (other_user, other_secret) = app.paper_user().await;
    app.enqueue(&alert(other_user, &other_secret, "buy")).await;

    // Retrying after Retry-After succeeds.
    let wait = loop {
        let r = post(
            &app.http,
            format!("http://{other}/webhook"),
            &alert(user, &secret, "buy"),
        )
        .await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break retry_after(&r);
        }
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    };
    tokio::time::sleep(Duration::from_secs(wait)).await;
    app.enqueue(&alert(user, &secret, "buy")).await;
    app.cleanup().await;
}

#[tokio::test]
async fn the_ip_allowlist_trusts_forwarded_for_only_from_configured_proxies() {
    let app = TestApp::spawn_with(|c| {
        c.ip_allowlist = Some(sparky::net::parse_list("tradingview").unwrap());
    })
    .await;
    let (user, secret) = app.paper_user().await;
    let send = |addr: std::net::SocketAddr, xff: Option<&str>| {
        let mut rq = app
            .http
            .post(format!("http://{addr}/webhook"))
            .json(&alert(user, &secret, "buy"));
        if let Some(x) = xff {
            rq = rq.header("X-Forwarded-For", x);
        }
        rq.send()
    };
    // Direct (no trusted proxy): the peer 127.0.0.1 is not allowed, and a forged header changes nothing.
    assert_eq!(
        send(app.addr, None).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    let r = send(app.addr, Some("52.89.214.238")).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "requests from this address are not allowed");

    // Behind a trusted proxy (127.0.0.1 here): the address the proxy saw decides.
    let mut behind = app.config.clone();
    behind.trusted_proxies = sparky::net::parse_list("127.0.0.1").unwrap();
    let proxied = second_ingress(&app, &behind).await;
    for tv in [
        "52.89.214.238",
        "34.212.75.30",
        "54.218.53.128",
        "52.32.178.7",
    ] {
        assert_eq!(
            send(proxied, Some(tv)).await.unwrap().status(),
            StatusCode::ACCEPTED
        );
    }
    // The client wrote the left part; the proxy appended the real peer on the right.
    let r = send(proxied, Some("52.89.214.238, 203.0.113.9"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        send(proxied, None).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(app.queued_entries().await, 4);
    app.cleanup().await;
}

// ---- property tests ----

/// Any JSON value, nested a little.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        "[0-9]{1,30}(\\.[0-9]{1,30})?"
            .prop_map(|s| { serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s)) }),
        "-?[0-9]{0,8}(\\.[0-9]{0,8})?([eE][-+]?[0-9]{1,3})?".prop_map(Value::String),
        "\\PC{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "NaN", "inf", "-0", "0", "1e309", "0x10", " 5 ", "", "buy", "paper", "limit", "\u{0}",
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field's value: absent, a plausible one, or anything.
fn field(plausible: Vec<&'static str>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => Just(None),
        5 => prop::sample::select(plausible).prop_map(|s| Some(Value::String(s.into()))),
        3 => any_json().prop_map(Some),
    ]
}

#[derive(Debug, Clone)]
enum Who {
    Own,
    Other,
    Random,
    Value(Value),
}

#[derive(Debug, Clone)]
struct Input {
    secret: u8, // 0 own, 1 other's, 2 wrong, 3 absent, 4 wrong type, 5 header only
    who: Option<Who>,
    fields: Vec<(&'static str, Option<Value>)>,
    /// 0: every field as generated; 1: a valid alert with one field as generated; 2: a valid alert.
    mode: u8,
    mutated: prop::sample::Index,
    raw: Option<Vec<u8>>,
    text_plain: bool,
}

fn input() -> impl Strategy<Value = Input> {
    let who = prop_oneof![
        4 => Just(Some(Who::Own)),
        1 => Just(Some(Who::Other)),
        1 => Just(Some(Who::Random)),
        1 => Just(None),
        1 => any_json().prop_map(|v| Some(Who::Value(v))),
    ];
    let fields = (
        field(vec![
            "paper", "PAPER", "aster", "oanda", "tradier", "kraken", "",
        ]),
        field(vec![
            "buy", "sell", "close", "long", "short", "exit", "flat", "hold", "BUY",
        ]),
        field(vec![
            "BINANCE:ETHUSDT",
            "ethusdt",
            "EURUSD",
            "",
            ":",
            "A:B:C",
            "ETH/USDT",
            "x",
        ]),
        field(vec!["market", "limit", "stop", "MARKET"]),
        field(vec![
            "3000",
            "0",
            "-1",
            "1e3",
            "NaN",
            "0.5",
            "99999999999999999999999999999",
        ]),
        field(vec!["100", "0", "-5", "0.0001", "1e400", "abc", "100.5"]),
        field(vec!["1", "0", "99.9", "100", "50"]),
        field(vec!["2", "-1", "150"]),
        field(vec![
            "2024-01-01T00:00:00Z",
            "1700000000000",
            "yesterday",
            "-1",
        ]),
        field(vec!["60", "0", "-3", "x"]),
        field(vec!["production", "sandbox", "staging"]),
        field(vec!["a1", "", "same-alert"]),
    );
    let secret = prop_oneof![
        5 => Just(0u8),
        1 => Just(1u8),
        1 => Just(2u8),
        1 => Just(3u8),
        1 => Just(4u8),
        2 => Just(5u8),
    ];
    let mode = prop_oneof![4 => Just(0u8), 4 => Just(1u8), 2 => Just(2u8)];
    (
        (secret, who, mode, any::<prop::sample::Index>()),
        fields,
        prop::option::weighted(0.1, prop::collection::vec(any::<u8>(), 0..300)),
        any::<bool>(),
    )
        .prop_map(|((secret, who, mode, mutated), f, raw, text_plain)| Input {
            secret,
            who,
            mode,
            mutated,
            fields: vec![
                ("exchange", f.0),
                ("action", f.1),
                ("symbol", f.2),
                ("order_type", f.3),
                ("price", f.4),
                ("position_size_usd", f.5),
                ("stop_loss_percent", f.6),
                ("take_profit_percent", f.7),
                ("timestamp", f.8),
                ("max_lag_secs", f.9),
                ("environment", f.10),
                ("alert_id", f.11),
            ],
            raw,
            text_plain,
        })
}

#[test]
fn the_webhook_parser_never_panics_and_names_a_field() {
    let mut runner = TestRunner::new(PropConfig {
        cases: 10_000,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let strategy = (
        prop::collection::btree_map(
            prop::sample::select(vec![
                "secret",
                "user_id",
                "exchange",
                "action",
                "symbol",
                "order_type",
                "price",
                "position_size_usd",
                "stop_loss_percent",
                "take_profit_percent",
                "timestamp",
                "max_lag_secs",
                "environment",
                "alert_id",
                "strategy",
                "other",
            ]),
            any_json(),
            0..14,
        ),
        prop::collection::vec(any::<u8>(), 0..200),
    );
    runner
        .run(&strategy, |(fields, bytes)| {
            let _ = sparky::domain::parse_body(&bytes);
            let obj: Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let body = serde_json::to_vec(&Value::Object(obj)).unwrap();
            let parsed = sparky::domain::parse_body(&body).expect("an object parses");
            if let Err(errs) = sparky::domain::parse_alert(&parsed, None) {
                prop_assert!(!errs.is_empty());
                for e in errs {
                    prop_assert!(!e.field.is_empty() && !e.message.is_empty(), "{e:?}");
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn thousands_of_generated_webhooks_get_4xx_or_are_valid_and_never_enqueue_when_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::spawn_with(|c| {
        c.rate_limit = RateLimit::NONE;
        c.auth_fail_limit = 0;
    }));
    let (user, secret) = rt.block_on(app.paper_user());
    let (other_user, other_secret) = rt.block_on(app.paper_user());
    let mut runner = TestRunner::new(PropConfig {
        cases: 2_000,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let seen = std::cell::RefCell::new([0u32; 6]);
    runner
        .run(&input(), |inp| {
            let mut obj = Map::new();
            let body_secret = match inp.secret {
                0 => Some(json!(secret)),
                1 => Some(json!(other_secret)),
                2 => Some(json!("sk_0123")),
                4 => Some(json!([secret])),
                _ => None,
            };
            let user_id = match &inp.who {
                Some(Who::Own) => Some(json!(user)),
                Some(Who::Other) => Some(json!(other_user)),
                Some(Who::Random) => Some(json!(Uuid::new_v4())),
                Some(Who::Value(v)) => Some(v.clone()),
                None => None,
            };
            let given = [("secret", body_secret), ("user_id", user_id)];
            let valid = |k: &str| match k {
                "exchange" => Some(json!("paper")),
                "action" => Some(json!("buy")),
                "symbol" => Some(json!("BINANCE:ETHUSDT")),
                "position_size_usd" => Some(json!(100)),
                _ => None,
            };
            let chosen = inp.mutated.index(inp.fields.len());
            let fields: Vec<(&str, Option<Value>)> = inp
                .fields
                .iter()
                .enumerate()
                .map(|(i, (k, v))| match inp.mode {
                    1 if i != chosen => (*k, valid(k)),
                    2 => (*k, valid(k)),
                    _ => (*k, v.clone()),
                })
                .collect();
            for (k, v) in given.iter().chain(fields.iter()) {
                if let Some(v) = v {
                    obj.insert(k.to_string(), v.clone());
                }
            }
            let body = match &inp.raw {
                Some(raw) => raw.clone(),
                None => serde_json::to_vec(&Value::Object(obj)).unwrap(),
            };
            let header_secret = (inp.secret == 5).then(|| secret.clone());
            // What the contract says the answer must be.
            let expect_ok = sparky::domain::parse_body(&body).ok().and_then(|o| {
                let s = sparky::domain::body_secret(&o)
                    .map(str::to_string)
                    .or(header_secret.clone())?;
                let owner = if s == secret {
                    user
                } else if s == other_secret {
                    other_user
                } else {
                    return None;
                };
                let a = sparky::domain::parse_alert(&o, None).ok()?;
                (a.user_id == owner).then_some(a)
            });
            let (status, added) = rt.block_on(async {
                let before = app.queued_entries().await;
                let mut rq = app.http.post(app.url("/webhook")).body(body.clone());
                rq = rq.header(
                    "content-type",
                    if inp.text_plain {
                        "text/plain"
                    } else {
                        "application/json"
                    },
                );
                if let Some(s) = &header_secret {
                    rq = rq.header("X-Sparky-Secret", s);
                }
                let status = rq.send().await.unwrap().status();
                (status, app.queued_entries().await - before)
            });
            let slot = match status.as_u16() {
                202 => 0,
                200 => 1,
                400 => 2,
                401 => 3,
                413 => 4,
                _ => 5,
            };
            seen.borrow_mut()[slot] += 1;
            prop_assert!(
                matches!(status.as_u16(), 200 | 202 | 400 | 401 | 413),
                "status {status} for {inp:?}"
            );
            match &expect_ok {
                Some(_) => prop_assert!(
                    status == StatusCode::ACCEPTED || status == StatusCode::OK,
                    "a valid alert got {status}: {inp:?}"
                ),
                None => prop_assert!(
                    status.is_client_error(),
                    "an invalid alert got {status}: {inp:?}"
                ),
            }
            prop_assert_eq!(
                added,
                u64::from(status == StatusCode::ACCEPTED),
                "{:?}",
                inp
            );
            Ok::<(), TestCaseError>(())
        })
        .unwrap();
    // The generator reached the interesting answers (valid, invalid, unauthorised).
    let seen = seen.into_inner();
    eprintln!("answers [202, 200, 400, 401, 413, other]: {seen:?}");
    assert!(seen[0] > 20 && seen[2] > 100 && seen[3] > 100, "{seen:?}");
    rt.block_on(app.cleanup());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_two_real_ingress_processes() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // 5 at once, then one every 10 s: within the test, exactly 5 pass in total.
    let env = [
        ("SPARKY_RATE_LIMIT_PER_SEC", "0.1".to_string()),
        ("SPARKY_RATE_LIMIT_BURST", "5".to_string()),
    ];
    let (_a, port_a) = crate::procs::spawn_ingress(&app, &env).await;
    let (_b, port_b) = crate::procs::spawn_ingress(&app, &env).await;
    let (mut accepted, mut limited) = (0, [0u32; 2]);
    for i in 0..12 {
        let port = [port_a, port_b][i % 2];
        let r = post(
            &app.http,
            format!("http://127.0.0.1:{port}/webhook"),
            &alert(user, &secret, "buy"),
        )
        .await;
        match r.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited[i % 2] += 1;
                assert!(retry_after(&r) >= 1);
            }
            s => panic!("unexpected {s}: {}", r.text().await.unwrap_or_default()),
        }
    }
    assert_eq!(accepted, 5, "one bucket shared by both processes");
    assert!(
        limited[0] > 0 && limited[1] > 0,
        "both processes refused: {limited:?}"
    );
    assert_eq!(app.queued_entries().await, 5);
    app.cleanup().await;
}
