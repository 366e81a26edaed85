//! Authentication on the open internet: failed authentications never lock out a user with a valid
//! secret (per-pair blocking, shared sources, IPv6 /64), and a flood of random secrets is absorbed
//! by the bounded look-up queue without exhausting the Postgres pool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use sparky::config::Config;
use sparky::ingress::{AppState, SecretCache};
use sparky::net::parse_list;
use sparky::queue::Queue;
use sparky::store::Store;
use uuid::Uuid;

use crate::helpers::*;

/// Another ingress over the same database and namespace with its own pool, caches and failure
/// notes (a fresh replica, or one just restarted): its pool and look-up statistics are returned.
async fn fresh_ingress(app: &TestApp, config: &Config) -> (SocketAddr, Store, Arc<SecretCache>) {
    let store = Store::connect(&config.database_url, 8).await.unwrap();
    let queue = Queue::connect(
        &config.redis_url,
        &config.namespace,
        config.partitions,
        Duration::from_millis(1000),
    )
    .await
    .unwrap();
    let state = AppState::new(config, store.clone(), queue);
    let secrets = state.secrets.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sparky::ingress::serve(
        state,
        listener,
        app.shutdown.clone(),
    ));
    (addr, store, secrets)
}

/// POST an alert to `addr`, as if from `from` (the ingress trusts 127.0.0.1 as a proxy).
async fn post_from(
    http: &reqwest::Client,
    addr: SocketAddr,
    from: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut rq = http.post(format!("http://{addr}/webhook")).json(body);
    if let Some(ip) = from {
        rq = rq.header("X-Forwarded-For", ip);
    }
    rq.send().await.unwrap()
}

fn retry_after(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn bad_secret() -> String {
    format!("sk_{}", Uuid::new_v4().simple())
}

#[tokio::test]
async fn failures_from_a_shared_source_block_only_the_claimed_user_and_never_a_valid_secret() {
    // 127.0.0.1 stands for TradingView: one address carrying every user's alerts.
    let app = TestApp::spawn_with(|c| {
        c.auth_fail_limit = 3;
        c.auth_fail_window = Duration::from_secs(60);
        c.shared_sources = parse_list("127.0.0.1").unwrap();
    })
    .await;
    let (victim, victim_secret) = app.paper_user().await;
    let (bystander, bystander_secret) = app.paper_user().await;

    // Someone sends bad secrets in the victim's name.
    for _ in 0..3 {
        let (status, _) = app.post_webhook(&alert(victim, &bad_secret(), "buy")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let r = post_from(
        &app.http,
        app.addr,
        None,
        &alert(victim, &bad_secret(), "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!((1..=60).contains(&retry_after(&r)));
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("failed authentications"),
        "{v}"
    );

    // Only that pair is blocked: bad secrets in another user's name are still plain 401s (the
    // shared address as a whole is never blocked)...
    for _ in 0..3 {
        let (status, _) = app
            .post_webhook(&alert(bystander, &bad_secret(), "buy"))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // ...and the victim's own secret, never seen by this ingress (not cached), is verified and works.
    let (status, v) = app
        .post_webhook(&alert(victim, &victim_secret, "buy"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    app.enqueue(&alert(bystander, &bystander_secret, "buy"))
        .await;

    // The count is shared by replicas: a fresh ingress answers 429 at its first failure for the pair,
    // and still accepts the victim's valid secret, uncached there too.
    let (other, _, _) = fresh_ingress(&app, &app.config).await;
    let r = post_from(&app.http, other, None, &alert(victim, &bad_secret(), "buy")).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let r = post_from(
        &app.http,
        other,
        None,
        &alert(victim, &victim_secret, "close"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // A valid secret of someone else claiming the victim's id is a failure of the pair: 429.
    let r = post_from(
        &app.http,
        other,
        None,
        &alert(victim, &bystander_secret, "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(app.queued_entries().await, 3);
    app.cleanup().await;
}

#[tokio::test]
async fn a_source_that_is_not_shared_is_blocked_as_a_whole_but_valid_secrets_still_pass() {
    let app = TestApp::spawn_with(|c| {
        c.auth_fail_limit = 3;
        c.auth_fail_window = Duration::from_secs(60);
        c.trusted_proxies = parse_list("127.0.0.1").unwrap();
    })
    .await;
    let (user, secret) = app.paper_user().await;
    let attacker = Some("203.0.113.7");
    // Bad secrets in the names of different users: no pair reaches the limit, the address does.
    for _ in 0..3 {
        let r = post_from(
            &app.http,
            app.addr,
            attacker,
            &alert(Uuid::now_v7(), &bad_secret(), "buy"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let r = post_from(
        &app.http,
        app.addr,
        attacker,
        &alert(Uuid::now_v7(), &bad_secret(), "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // Without any secret too.
    let mut no_secret = alert(user, "x", "buy");
    no_secret.as_object_mut().unwrap().remove("secret");
    let r = post_from(&app.http, app.addr, attacker, &no_secret).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // A valid (uncached) secret from the blocked address is still verified and accepted.
    let r = post_from(&app.http, app.addr, attacker, &alert(user, &secret, "buy")).await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Other addresses are unaffected.
    let r = post_from(
        &app.http,
        app.addr,
        Some("203.0.113.8"),
        &alert(user, &bad_secret(), "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // TradingView's addresses are shared sources by default: never blocked as a whole.
    for i in 0..6 {
        let r = post_from(
            &app.http,
            app.addr,
            Some("52.89.214.238"),
            &alert(Uuid::now_v7(), &bad_secret(), "buy"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "failure {i}");
    }
    assert_eq!(app.queued_entries().await, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn ipv6_failures_are_counted_per_slash_64() {
    let app = TestApp::spawn_with(|c| {
        c.auth_fail_limit = 3;
        c.auth_fail_window = Duration::from_secs(60);
        c.trusted_proxies = parse_list("127.0.0.1").unwrap();
    })
    .await;
    let (user, secret) = app.paper_user().await;
    // Every failure from another address of the same /64.
    for i in 1..=3 {
        let ip = format!("2001:db8:1:2::{i:x}");
        let r = post_from(
            &app.http,
            app.addr,
            Some(&ip),
            &alert(Uuid::now_v7(), &bad_secret(), "buy"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{ip}");
    }
    let r = post_from(
        &app.http,
        app.addr,
        Some("2001:db8:1:2:ffff:ffff:ffff:fffe"),
        &alert(Uuid::now_v7(), &bad_secret(), "buy"),
    )
    .await;
    assert_eq!(
        r.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a new address in the same /64 is the same source"
    );
    // The neighbouring /64 is another source.
    let r = post_from(
        &app.http,
        app.addr,
        Some("2001:db8:1:3::1"),
        &alert(Uuid::now_v7(), &bad_secret(), "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A valid secret from the blocked /64 still works.
    let r = post_from(
        &app.http,
        app.addr,
        Some("2001:db8:1:2::77"),
        &alert(user, &secret, "buy"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    app.cleanup().await;
}

/// The scenario: a flood of bad secrets from a shared address (TradingView) while 50 known
/// users post from the same address to a fresh ingress (none of their secrets is cached). Every
/// known user's alert is accepted, no look-up fails (a pool time-out would be one), and never more
/// look-up queries run at once than the bound (on their own pool, so the ingress's pool is untouched).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_secrets_from_a_shared_source_never_locks_out_known_users() {
    let app = TestApp::spawn_with(|c| {
        c.shared_sources = parse_list("127.0.0.1").unwrap();
        c.auth_fail_limit = 20;
        c.rate_limit = sparky::queue::RateLimit::NONE;
        // A bound on waiting, not a timing assertion: generous for a loaded debug build.
        c.secret_lookup_wait = Duration::from_secs(20);
    })
    .await;
    let mut users = vec![];
    for _ in 0..50 {
        users.push(app.paper_user().await);
    }
    let (addr, store, secrets) = fresh_ingress(&app, &app.config).await;
    let concurrency = app.config.secret_lookup_concurrency as u64;

    // 48 connections of random secrets, half of them in the known users' names (so those users'
    // pairs get blocked as well), until the known users are done.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut flood = vec![];
    for c in 0..48 {
        let (stop, sent, http) = (stop.clone(), sent.clone(), reqwest::Client::new());
        let names: Vec<Uuid> = users.iter().map(|(u, _)| *u).collect();
        flood.push(tokio::spawn(async move {
            let mut answers = std::collections::BTreeMap::<u16, u64>::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let claimed = if i % 2 == 0 {
                    names[i % names.len()]
                } else {
                    Uuid::now_v7()
                };
                let r = post_from(&http, addr, None, &alert(claimed, &bad_secret(), "buy")).await;
                let status = r.status();
                if status == StatusCode::SERVICE_UNAVAILABLE
                    || status == StatusCode::TOO_MANY_REQUESTS
                {
                    assert!(
                        r.headers().contains_key("retry-after"),
                        "{status} without Retry-After"
                    );
                }
                *answers.entry(status.as_u16()).or_default() += 1;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            answers
        }));
    }
    // The known users start once the flood is under way (no sleeping: wait for a count).
    while sent.load(Ordering::Relaxed) < 300 {
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut known = vec![];
    for (user, secret) in &users {
        let (user, secret, http) = (*user, secret.clone(), reqwest::Client::new());
        known.push(tokio::spawn(async move {
            let r = post_from(&http, addr, None, &alert(user, &secret, "buy")).await;
            let status = r.status();
            (user, status, r.text().await.unwrap_or_default())
        }));
    }
    let mut refused = vec![];
    for k in known {
        let (user, status, body) = k.await.unwrap();
        if status != StatusCode::ACCEPTED {
            refused.push(format!("{user}: {status} {body}"));
        }
    }
    // Keep flooding a little after the last known user, then stop.
    let after = sent.load(Ordering::Relaxed) + 200;
    while sent.load(Ordering::Relaxed) < after {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers = std::collections::BTreeMap::<u16, u64>::new();
    for f in flood {
        for (s, n) in f.await.unwrap() {
            *answers.entry(s).or_default() += n;
        }
    }
    let stats = secrets.stats();
    let (queries, looked_up, max_in_flight, errors) = (
        stats.queries.load(Ordering::Relaxed),
        stats.secrets.load(Ordering::Relaxed),
        stats.max_in_flight.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
    );
    eprintln!(
        "flood answers {answers:?}; {looked_up} secrets looked up in {queries} queries, at most {max_in_flight} at once; pool {} connections",
        store.pool.size()
    );
    assert!(refused.is_empty(), "known users refused: {refused:#?}");
    let flood_total: u64 = answers.values().sum();
    assert!(flood_total >= 500, "the flood ran: {answers:?}");
    for s in answers.keys() {
        assert!(
            [401, 429, 503].contains(s),
            "a bad secret got {s}: {answers:?}"
        );
    }
    assert_eq!(errors, 0, "a secret look-up failed (pool time-out?)");
    assert!(
        max_in_flight <= concurrency,
        "{max_in_flight} look-up queries at once (bound {concurrency})"
    );
    assert!(
        store.pool.size() <= 1,
        "the webhook path used the ingress's main pool ({} connections)",
        store.pool.size()
    );
    assert!(
        looked_up >= 50,
        "the known users were looked up: {looked_up}"
    );
    assert_eq!(
        app.queued_entries().await,
        50,
        "exactly the known users' alerts"
    );
    app.cleanup().await;
}
