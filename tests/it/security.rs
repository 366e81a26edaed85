//! Security: secret rotation, credentials never in plaintext, key rotation, limits, source addresses,
//! and a property test of the webhook endpoint.

use std::collections::BTreeSet;
use std::time::Duration;

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
        config.redis_target(),
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
    // The new secret works at once (it was never cached as unknown).
    app.enqueue(&alert(user, new.expose(), "close")).await;
    // Once a whole TTL has passed since the rotation (the old secret was cached before it), no
    // cache may still hold the old secret: a wait that only ever errs on the long side, so a slow
    // machine cannot make this fail, while a cache that outlives its TTL does.
    tokio::time::sleep(ttl).await;
    let before = app.queued_entries().await;
    let (status, v) = app.post_webhook(&alert(user, &old, "close")).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old secret still worked a whole cache TTL ({ttl:?}) after the rotation: {v}"
    );
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
    assert_eq!(app.queued_entries().await, before, "a 401 enqueues nothing");
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
            // Expired between KEYS and TYPE (a rate-limit bucket lives 3 s): nothing to read.
            "none" => continue,
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
    let statuses: Vec<&str> = {
        let mut v = vec![];
        for j in &jobs {
            v.push(app.job(*j).await.status.as_str());
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
    assert_eq!(app.job(job).await.status, sparky::job::JobStatus::Succeeded);

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

/// A refill so slow (one token in about 11 days) that no test run sees one: the number of
/// requests a bucket lets through is exactly its burst, however slow the machine.
const NO_REFILL: f64 = 1e-6;

#[tokio::test]
async fn the_rate_limit_is_shared_by_two_ingress_processes_and_429_says_when_to_retry() {
    let limit = RateLimit {
        per_sec: NO_REFILL,
        burst: 4,
    };
    let app = TestApp::spawn_with(|c| c.rate_limit = limit).await;
    let other = second_ingress(&app, &app.config).await;
    let (user, secret) = app.paper_user().await;
    let addrs = [app.addr, other];

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
                assert!(secs >= 1, "Retry-After {secs}");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["retry_after_secs"], secs);
                assert!(v["error"].as_str().unwrap().contains("rate limit"), "{v}");
            }
            s => panic!("unexpected {s}"),
        }
    }
    // One bucket for both: exactly the burst. Separate buckets per process would take 8.
    assert_eq!(accepted, limit.burst as u64, "{limited:?}");
    assert!(limited[0] > 0 && limited[1] > 0, "{limited:?}");
    assert_eq!(
        app.queued_entries().await,
        accepted,
        "a 429 enqueues nothing"
    );

    // Per user: someone else is not affected.
    let (other_user, other_secret) = app.paper_user().await;
    app.enqueue(&alert(other_user, &other_secret, "buy")).await;

    // Retrying after Retry-After succeeds: an ingress refilling one token a second, burst 1.
    let mut quick = app.config.clone();
    quick.rate_limit = RateLimit {
        per_sec: 1.0,
        burst: 1,
    };
    let quick = second_ingress(&app, &quick).await;
    let (user, secret) = app.paper_user().await;
    let mut tries = 0;
    let wait = loop {
        tries += 1;
        assert!(tries <= 100, "never rate limited");
        let r = post(
            &app.http,
            format!("http://{quick}/webhook"),
            &alert(user, &secret, "buy"),
        )
        .await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break retry_after(&r);
        }
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    };
    // An empty bucket refilling a token a second: at most a second to wait, rounded up.
    assert_eq!(wait, 1, "Retry-After");
    // Waiting that long is always enough (a slow machine only waits longer).
    tokio::time::sleep(Duration::from_secs(wait)).await;
    let r = post(
        &app.http,
        format!("http://{quick}/webhook"),
        &alert(user, &secret, "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED, "after Retry-After");
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

/// A generated field and what the contract says of it, decided by the generator (never by the
/// parser under test).
#[derive(Debug, Clone)]
enum Gen {
    /// Not sent: missing (`None`) or `null`.
    Absent(Option<Value>),
    /// Blank text. For a required field it is an error either way; for an optional one the
    /// contract does not say whether it counts as absent or as a bad value: either answer is right.
    Blank(Value),
    /// A value the contract accepts.
    Ok(Value),
    /// A value the contract refuses (a 400 naming the field).
    Bad(Value),
}

fn gen(
    absent: u32,
    ok: Vec<Value>,
    ok_weight: u32,
    bad: Vec<Value>,
    bad_weight: u32,
) -> impl Strategy<Value = Gen> {
    prop_oneof![
        absent => prop::sample::select(vec![None, None, Some(Value::Null)]).prop_map(Gen::Absent),
        1 => prop::sample::select(vec![json!(""), json!("  ")]).prop_map(Gen::Blank),
        ok_weight => prop::sample::select(ok).prop_map(Gen::Ok),
        bad_weight => prop::sample::select(bad).prop_map(Gen::Bad),
    ]
}

/// A field of the default kind: mostly absent or good, sometimes bad.
fn field(ok: Vec<Value>, bad: Vec<Value>) -> impl Strategy<Value = Gen> {
    gen(3, ok, 5, bad, 2)
}

fn long_text(c: char) -> Value {
    Value::String(std::iter::repeat_n(c, 257).collect())
}

/// Who the body's `user_id` names.
#[derive(Debug, Clone)]
enum Who {
    Own,
    Other,
    /// A well-formed UUID of no user.
    Nobody,
    /// Missing, null or blank.
    Absent(Option<Value>),
    /// Not a UUID.
    Bad(Value),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum SecretIs {
    /// The user's, in the body.
    Own,
    /// The other user's, in the body.
    Others,
    /// Nobody's.
    Wrong,
    Absent,
    /// The user's, but not a string (and no header): no secret at all.
    WrongType,
    /// The user's, in the `X-Sparky-Secret` header only.
    HeaderOnly,
    /// A blank body field; the user's in the header.
    BlankBodyHeader,
}

#[derive(Debug, Clone)]
struct Input {
    secret: SecretIs,
    who: Who,
    fields: Vec<(&'static str, Gen)>,
    /// 0: every field as generated; 1: a valid alert with one field as generated; 2: a valid alert.
    mode: u8,
    mutated: prop::sample::Index,
    /// A body that is not a JSON object at all.
    raw: Option<Vec<u8>>,
    /// Padding that takes the body past the 64 KiB limit.
    oversize: bool,
    text_plain: bool,
}

fn input() -> impl Strategy<Value = Input> {
    let who = prop_oneof![
        8 => Just(Who::Own),
        1 => Just(Who::Other),
        1 => Just(Who::Nobody),
        1 => prop::sample::select(vec![None, Some(Value::Null), Some(json!(""))]).prop_map(Who::Absent),
        1 => prop::sample::select(vec![json!("bob"), json!(5), json!(true), json!([1]), json!({"id": 1}),
                json!("0195f3d0-0000-7000-8000")]).prop_map(Who::Bad),
    ];
    let secret = prop_oneof![
        10 => Just(SecretIs::Own),
        1 => Just(SecretIs::Others),
        1 => Just(SecretIs::Wrong),
        1 => Just(SecretIs::Absent),
        1 => Just(SecretIs::WrongType),
        2 => Just(SecretIs::HeaderOnly),
        1 => Just(SecretIs::BlankBodyHeader),
    ];
    let fields = (
        // required
        gen(
            1,
            vec![
                json!("paper"),
                json!("PAPER"),
                json!(" paper "),
                json!("aster"),
                json!("oanda"),
                json!("tradier"),
                json!("Tradier"),
            ],
            8,
            vec![
                json!("kraken"),
                json!("binance"),
                json!(7),
                json!(true),
                json!(["paper"]),
                json!({"x": 1}),
            ],
            2,
        ),
        gen(
            1,
            vec![
                json!("buy"),
                json!("sell"),
                json!("close"),
                json!("long"),
                json!("short"),
                json!("exit"),
                json!("flat"),
                json!("BUY"),
                json!(" Sell "),
            ],
            8,
            vec![
                json!("hold"),
                json!("buy!"),
                json!(1),
                json!(false),
                json!([]),
                json!({}),
            ],
            2,
        ),
        gen(
            1,
            vec![
                json!("BINANCE:ETHUSDT"),
                json!("ethusdt"),
                json!("EURUSD"),
                json!("EUR_USD"),
                json!("ETH/USDT"),
                json!("BRK.B"),
                json!("x"),
                json!("A:B:C"),
            ],
            8,
            vec![
                json!(":"),
                json!("BINANCE:"),
                json!("ETH USDT"),
                json!("ETH$"),
                Value::String("A".repeat(33)),
                json!(true),
                json!([]),
                json!({}),
            ],
            2,
        ),
        // optional, or required depending on another field
        field(
            vec![
                json!("market"),
                json!("limit"),
                json!("MARKET"),
                json!("Limit"),
            ],
            vec![json!("stop"), json!("stop_limit"), json!(1), json!(true)],
        ),
        field(
            vec![
                json!("3000"),
                json!(3000),
                json!("0.5"),
                json!(0.25),
                json!("65000.10"),
            ],
            vec![
                json!("0"),
                json!(0),
                json!("-1"),
                json!(-2.5),
                json!("abc"),
                json!("NaN"),
                json!(true),
                json!([1]),
            ],
        ),
        gen(
            2,
            vec![
                json!("100"),
                json!(100),
                json!("100.5"),
                json!("0.0001"),
                json!(250.75),
            ],
            6,
            vec![
                json!("0"),
                json!(0),
                json!("-5"),
                json!("abc"),
                json!(true),
                json!({}),
            ],
            2,
        ),
        field(
            vec![json!("1"), json!("99.9"), json!(50), json!("0.5")],
            vec![
                json!("0"),
                json!("100"),
                json!(150),
                json!("-1"),
                json!("x"),
                json!(true),
            ],
        ),
        field(
            vec![json!("2"), json!(5), json!("99")],
            vec![json!("0"), json!(100), json!("-1"), json!("150"), json!([])],
        ),
        field(
            vec![
                json!("2024-01-01T00:00:00Z"),
                json!(1_700_000_000_000i64),
                json!("1700000000000"),
                json!("2026-01-01T12:00:00+02:00"),
            ],
            vec![
                json!("yesterday"),
                json!("2024-13-45"),
                json!(true),
                json!([]),
                json!({}),
            ],
        ),
        field(
            vec![json!("60"), json!(60), json!(1)],
            vec![
                json!("0"),
                json!(0),
                json!("-3"),
                json!("x"),
                json!(1.5),
                json!(true),
            ],
        ),
        field(
            vec![json!("production"), json!("sandbox"), json!("SANDBOX")],
            vec![json!("staging"), json!(5), json!(true)],
        ),
    );
    let texts = (
        // `alert_id`: a good one is made unique per case (so no case is a duplicate of another).
        field(
            vec![json!("unique")],
            vec![long_text('a'), json!(true), json!([]), json!({})],
        ),
        field(
            vec![json!("s1"), json!("trend follower")],
            vec![long_text('s'), json!(true), json!({})],
        ),
        field(
            vec![json!("Trend"), json!("my strategy")],
            vec![long_text('t'), json!(false), json!([1])],
        ),
    );
    let raw = prop::option::weighted(
        0.05,
        prop_oneof![
            prop::sample::select(vec![
                "",
                "not json",
                "[1,2]",
                "\"str\"",
                "{",
                "null",
                "42",
                "{\"secret\": }",
                "{}}",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            // Never JSON: it starts with `#`.
            prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| [b"#".to_vec(), b].concat()),
        ],
    );
    let mode = prop_oneof![4 => Just(0u8), 4 => Just(1u8), 2 => Just(2u8)];
    (
        (secret, who, mode, any::<prop::sample::Index>()),
        fields,
        texts,
        raw,
        prop::bool::weighted(0.02),
        any::<bool>(),
    )
        .prop_map(
            |((secret, who, mode, mutated), f, t, raw, oversize, text_plain)| Input {
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
                    ("alert_id", t.0),
                    ("strategy_id", t.1),
                    ("strategy", t.2),
                ],
                raw,
                oversize,
                text_plain,
            },
        )
}

/// The answer the contract gives, worked out from what the generator knows of each field.
#[derive(Debug, PartialEq)]
enum Expect {
    Accepted,
    Unauthorized,
    TooLarge,
    /// A 400 that names every field in `must`, and no field outside `must` and `may` (a blank
    /// optional field, or one whose requirement depends on a field that is itself bad, may be named
    /// or not).
    Invalid {
        must: BTreeSet<&'static str>,
        may: BTreeSet<&'static str>,
    },
    /// Only fields the contract leaves open are in question (blank optional text): `otherwise`, or a
    /// 400 naming some of `may` and nothing else.
    Either {
        otherwise: Box<Expect>,
        may: BTreeSet<&'static str>,
    },
}

fn expected(inp: &Input, fields: &[(&'static str, Gen)]) -> Expect {
    if inp.raw.is_some() {
        return Expect::Invalid {
            must: BTreeSet::from(["body"]),
            may: BTreeSet::new(),
        };
    }
    if inp.oversize {
        return Expect::TooLarge;
    }
    // Authentication comes first: nothing about the body is told to a caller without a secret.
    let owner = match inp.secret {
        SecretIs::Own | SecretIs::HeaderOnly | SecretIs::BlankBodyHeader => Who::Own,
        SecretIs::Others => Who::Other,
        SecretIs::Wrong | SecretIs::Absent | SecretIs::WrongType => return Expect::Unauthorized,
    };
    let mut must = BTreeSet::new();
    let mut may = BTreeSet::new();
    // An absent `user_id` is the secret's owner (issue 19); a present one must be a UUID.
    if matches!(inp.who, Who::Bad(_)) {
        must.insert("user_id");
    }
    let required = |name: &str| matches!(name, "exchange" | "action" | "symbol");
    for (name, g) in fields {
        match g {
            Gen::Bad(_) => {
                must.insert(*name);
            }
            Gen::Absent(_) | Gen::Blank(_) if required(name) => {
                must.insert(*name);
            }
            Gen::Blank(_) => {
                may.insert(*name);
            }
            Gen::Absent(_) | Gen::Ok(_) => {}
        }
    }
    // `price` is required for a limit order, `position_size_usd` for buy and sell: then missing or
    // blank, it is an error.
    let get = |k: &str| &fields.iter().find(|(n, _)| *n == k).unwrap().1;
    let is = |v: &Value, among: &[&str]| {
        v.as_str()
            .is_some_and(|s| among.contains(&s.trim().to_ascii_lowercase().as_str()))
    };
    let needed = |on: &str, when: &[&str]| match get(on) {
        Gen::Ok(v) => Some(is(v, when)),
        // The default order type is market.
        Gen::Absent(_) if on == "order_type" => Some(false),
        // Unknowable: the deciding field is missing, blank or bad.
        _ => None,
    };
    for (dep, on, when) in [
        ("price", "order_type", &["limit"][..]),
        (
            "position_size_usd",
            "action",
            &["buy", "sell", "long", "short"][..],
        ),
    ] {
        if let Gen::Absent(_) | Gen::Blank(_) = get(dep) {
            match needed(on, when) {
                Some(true) => {
                    must.insert(dep);
                    may.remove(dep);
                }
                Some(false) => {}
                None => {
                    may.insert(dep);
                }
            }
        }
    }
    if !must.is_empty() {
        return Expect::Invalid { must, may };
    }
    let claimed_is_owner = matches!(
        (&inp.who, owner),
        (Who::Own, Who::Own) | (Who::Other, Who::Other) | (Who::Absent(_), _)
    );
    let otherwise = if claimed_is_owner {
        Expect::Accepted
    } else {
        Expect::Unauthorized
    };
    if may.is_empty() {
        otherwise
    } else {
        Expect::Either {
            otherwise: Box::new(otherwise),
            may,
        }
    }
}

/// Does the answer (`status`, JSON body) agree with `expect`?
fn check(expect: &Expect, status: StatusCode, answer: &Value) -> Result<(), String> {
    let named = || -> BTreeSet<&str> {
        answer["errors"]
            .as_array()
            .map(|errs| errs.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default()
    };
    match expect {
        Expect::Accepted if status == StatusCode::ACCEPTED && answer["status"] == "queued" => {
            Ok(())
        }
        Expect::Accepted => Err("a valid alert was not queued".into()),
        Expect::Unauthorized if status == StatusCode::UNAUTHORIZED => Ok(()),
        Expect::Unauthorized => Err("not refused as unauthorised".into()),
        Expect::TooLarge if status == StatusCode::PAYLOAD_TOO_LARGE => Ok(()),
        Expect::TooLarge => Err("an oversized body was not refused as too large".into()),
        Expect::Invalid { must, may } => {
            if status != StatusCode::BAD_REQUEST {
                return Err("an invalid alert was not refused as invalid".into());
            }
            let named = named();
            let missing: Vec<_> = must.difference(&named).collect();
            let extra: Vec<_> = named
                .iter()
                .filter(|f| !must.contains(*f) && !may.contains(*f))
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                return Err(format!(
                    "fields not named: {missing:?}; named but not wrong: {extra:?}"
                ));
            }
            if !named.contains(answer["field"].as_str().unwrap_or("")) {
                return Err("`field` is not one of the named fields".into());
            }
            Ok(())
        }
        Expect::Either { otherwise, may } => {
            if status != StatusCode::BAD_REQUEST {
                return check(otherwise, status, answer);
            }
            let named = named();
            if named.is_empty() || !named.iter().all(|f| may.contains(f)) {
                return Err(format!("named {named:?}; only some of {may:?} could be"));
            }
            Ok(())
        }
    }
}

#[test]
fn thousands_of_generated_webhooks_get_the_answer_the_contract_gives_and_never_enqueue_when_refused(
) {
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
    // The strategies the generator names exist (a name no strategy has is a 400, tested in
    // templates.rs); they set nothing, so the alert's own fields decide.
    for u in [user, other_user] {
        for (name, id) in [("Trend", "s1"), ("my strategy", "trend follower")] {
            let s = sparky::strategy::Strategy {
                user_id: u,
                name: name.into(),
                strategy_id: Some(id.into()),
                exchange: None,
                environment: None,
                sizing: None,
                stop_loss_percent: None,
                take_profit_percent: None,
                trailing_stop_percent: None,
                order_type: None,
                enabled: true,
            };
            rt.block_on(app.store.upsert_strategy(&s)).unwrap();
        }
    }
    let mut runner = TestRunner::new(PropConfig {
        cases: 2_000,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let seen = std::cell::RefCell::new([0u32; 6]);
    let case = std::cell::Cell::new(0u64);
    runner
        .run(&input(), |inp| {
            case.set(case.get() + 1);
            let valid = |k: &str| match k {
                "exchange" => Gen::Ok(json!("paper")),
                "action" => Gen::Ok(json!("buy")),
                "symbol" => Gen::Ok(json!("BINANCE:ETHUSDT")),
                "position_size_usd" => Gen::Ok(json!(100)),
                _ => Gen::Absent(None),
            };
            let chosen = inp.mutated.index(inp.fields.len());
            let fields: Vec<(&'static str, Gen)> = inp
                .fields
                .iter()
                .enumerate()
                .map(|(i, (k, g))| match inp.mode {
                    1 if i != chosen => (*k, valid(k)),
                    2 => (*k, valid(k)),
                    _ => (*k, g.clone()),
                })
                .collect();
            let expect = expected(&inp, &fields);

            let mut obj = Map::new();
            match inp.secret {
                SecretIs::Own => {
                    obj.insert("secret".into(), json!(secret));
                }
                SecretIs::Others => {
                    obj.insert("secret".into(), json!(other_secret));
                }
                SecretIs::Wrong => {
                    obj.insert("secret".into(), json!("sk_0123"));
                }
                SecretIs::WrongType => {
                    obj.insert("secret".into(), json!([secret]));
                }
                SecretIs::BlankBodyHeader => {
                    obj.insert("secret".into(), json!(" "));
                }
                SecretIs::Absent | SecretIs::HeaderOnly => {}
            }
            let header_secret =
                matches!(inp.secret, SecretIs::HeaderOnly | SecretIs::BlankBodyHeader)
                    .then(|| secret.clone());
            match &inp.who {
                Who::Own => {
                    obj.insert("user_id".into(), json!(user));
                }
                Who::Other => {
                    obj.insert("user_id".into(), json!(other_user));
                }
                Who::Nobody => {
                    obj.insert("user_id".into(), json!(Uuid::new_v4()));
                }
                Who::Absent(Some(v)) | Who::Bad(v) => {
                    obj.insert("user_id".into(), v.clone());
                }
                Who::Absent(None) => {}
            }
            for (k, g) in &fields {
                let v = match g {
                    Gen::Absent(None) => continue,
                    Gen::Ok(v) if *k == "alert_id" => json!(format!("{v}-{}", case.get())),
                    Gen::Absent(Some(v)) | Gen::Blank(v) | Gen::Ok(v) | Gen::Bad(v) => v.clone(),
                };
                obj.insert(k.to_string(), v);
            }
            if inp.oversize {
                obj.insert("padding".into(), json!("p".repeat(70_000)));
            } else {
                // Unknown fields are ignored.
                obj.insert("comment".into(), json!({"note": "ignored", "n": [1, 2]}));
            }
            let body = match &inp.raw {
                Some(raw) => raw.clone(),
                None => serde_json::to_vec(&Value::Object(obj)).unwrap(),
            };
            let (status, answer, added) = rt.block_on(async {
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
                let r = rq.send().await.unwrap();
                let status = r.status();
                let answer: Value = r.json().await.unwrap_or(Value::Null);
                (status, answer, app.queued_entries().await - before)
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
            check(&expect, status, &answer).map_err(|what| {
                TestCaseError::fail(format!(
                    "{what}\nexpected {expect:?}, got {status} {answer}\nbody: {}\ninput: {inp:?}",
                    String::from_utf8_lossy(&body[..body.len().min(2000)])
                ))
            })?;
            prop_assert_eq!(
                added,
                u64::from(status == StatusCode::ACCEPTED),
                "{:?}",
                inp
            );
            Ok::<(), TestCaseError>(())
        })
        .unwrap();
    // The generator reached every kind of answer.
    let seen = seen.into_inner();
    eprintln!("answers [202, 200, 400, 401, 413, other]: {seen:?}");
    assert!(
        seen[0] > 100
            && seen[2] > 100
            && seen[3] > 100
            && seen[4] > 5
            && seen[1] == 0
            && seen[5] == 0,
        "{seen:?}"
    );
    rt.block_on(app.cleanup());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_two_real_ingress_processes() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // A burst of 5 and (in effect) no refill: exactly 5 pass in total, however slow the run.
    let env = [
        ("SPARKY_RATE_LIMIT_PER_SEC", NO_REFILL.to_string()),
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
