//! The user API (issue 15): API tokens, authorization (BOLA) on every route, stable pages, filters
//! and their errors, self-service replay, and the OpenAPI document against the served routes.

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sparky::queue::RateLimit;
use sparky::secrets::{generate_api_token, hash_api_token};
use uuid::Uuid;

use crate::helpers::*;

/// An API token for `user`, as `sparky user token create` makes one.
async fn token_for(app: &TestApp, user: Uuid) -> String {
    let t = generate_api_token();
    app.store
        .create_api_token(user, Uuid::now_v7(), &hash_api_token(t.expose()), None)
        .await
        .unwrap();
    t.expose().to_string()
}

async fn get(app: &TestApp, path: &str, token: &str) -> (StatusCode, Value) {
    let r = app
        .http
        .get(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn replay(app: &TestApp, job: Uuid, token: &str, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = app
        .http
        .post(app.url(&format!("/v1/jobs/{job}/replay")))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn ids(page: &Value, key: &str) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a page: {page}"))
        .iter()
        .map(|i| {
            i[key]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| i[key].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_404_or_nothing_for_another_users_objects() {
    let app = TestApp::spawn_with(|c| c.rate_limit = RateLimit::NONE).await;
    let (alice, alice_secret) = app.paper_user().await;
    let (bob, bob_secret) = app.paper_user().await;
    let alice_token = token_for(&app, alice).await;
    let bob_token = token_for(&app, bob).await;

    // Alice: a fill (a trade and a position) and a rejected job (no aster credentials).
    let alice_buy = app.enqueue(&alert(alice, &alice_secret, "buy")).await;
    let mut no_creds = alert(alice, &alice_secret, "buy");
    no_creds["exchange"] = json!("aster");
    no_creds["symbol"] = json!("BTCUSDT");
    let alice_rejected = app.enqueue(&no_creds).await;
    // Bob: a fill of his own.
    let bob_buy = app.enqueue(&alert(bob, &bob_secret, "buy")).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(alice_rejected).await.status.as_str(), "rejected");

    // Alice sees her own objects on every list.
    let (s, jobs) = get(&app, "/v1/jobs", &alice_token).await;
    assert_eq!(s, 200, "{jobs}");
    assert_eq!(
        ids(&jobs, "job_id"),
        [alice_rejected.to_string(), alice_buy.to_string()]
    );
    let (_, dl) = get(&app, "/v1/dead-letters", &alice_token).await;
    assert_eq!(ids(&dl, "job_id"), [alice_rejected.to_string()]);
    let (_, trades) = get(&app, "/v1/trades", &alice_token).await;
    assert_eq!(ids(&trades, "job_id"), [alice_buy.to_string()]);
    let (_, positions) = get(&app, "/v1/positions", &alice_token).await;
    assert_eq!(
        positions["items"].as_array().unwrap().len(),
        1,
        "{positions}"
    );
    assert_eq!(positions["items"][0]["exchange"], "paper");
    assert_eq!(positions["items"][0]["environment"], "production");
    assert_eq!(trades["items"][0]["environment"], "production");
    assert_eq!(trades["items"][0]["side"], "buy");
    assert_eq!(positions["items"][0]["symbol"], "ETHUSDT");
    assert_eq!(positions["items"][0]["last_job_id"], alice_buy.to_string());

    // Bob's token: Alice's ids are "not found", and no list shows anything of hers.
    for path in [
        format!("/v1/jobs/{alice_buy}"),
        format!("/v1/jobs/{alice_rejected}"),
    ] {
        let (s, v) = get(&app, &path, &bob_token).await;
        assert_eq!(s, 404, "{path}: {v}");
        assert_eq!(
            v,
            json!({"error": "not found"}),
            "the same answer as a missing job"
        );
    }
    let (s, _) = get(&app, &format!("/v1/jobs/{}", Uuid::now_v7()), &bob_token).await;
    assert_eq!(s, 404);
    let (s, v) = replay(&app, alice_rejected, &bob_token, None).await;
    assert_eq!(s, 404, "{v}");
    assert_eq!(
        app.job(alice_rejected).await.status.as_str(),
        "rejected",
        "another user's replay touched nothing"
    );
    let (_, jobs) = get(&app, "/v1/jobs", &bob_token).await;
    assert_eq!(ids(&jobs, "job_id"), [bob_buy.to_string()]);
    let (_, dl) = get(&app, "/v1/dead-letters", &bob_token).await;
    assert!(ids(&dl, "job_id").is_empty(), "{dl}");
    let (_, trades) = get(&app, "/v1/trades", &bob_token).await;
    assert_eq!(ids(&trades, "job_id"), [bob_buy.to_string()]);
    let (_, positions) = get(&app, "/v1/positions", &bob_token).await;
    assert_eq!(
        ids(&positions, "last_job_id"),
        [bob_buy.to_string()],
        "{positions}"
    );
    // Filters never widen the owner: Alice's symbol and exchange through Bob's token.
    let (_, v) = get(&app, "/v1/jobs?exchange=aster&symbol=BTCUSDT", &bob_token).await;
    assert!(ids(&v, "job_id").is_empty(), "{v}");

    // No token, a webhook secret as a token, a wrong scheme, a revoked token: 401 on every route.
    let routes = [
        ("GET", "/v1/jobs".to_string()),
        ("GET", "/v1/positions".to_string()),
        ("GET", "/v1/trades".to_string()),
        ("GET", "/v1/dead-letters".to_string()),
        ("GET", format!("/v1/jobs/{alice_buy}")),
        ("POST", format!("/v1/jobs/{alice_rejected}/replay")),
    ];
    let revoked = token_for(&app, alice).await;
    let revoked_id: Uuid =
        sqlx::query_scalar("SELECT token_id FROM api_tokens WHERE token_hash = $1")
            .bind(hash_api_token(&revoked))
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(
        app.store
            .revoke_api_tokens(alice, Some(revoked_id))
            .await
            .unwrap(),
        1
    );
    for (method, path) in &routes {
        for auth in [
            None,
            Some(format!("Bearer {alice_secret}")),
            Some(format!("Basic {alice_token}")),
            Some(format!("Bearer {revoked}")),
        ] {
            let mut req = app.http.request(method.parse().unwrap(), app.url(path));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{method} {path} with {auth:?}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer");
        }
    }
    // The job route still takes the webhook secret, and only the owner's.
    for (secret, want) in [(&alice_secret, 200), (&bob_secret, 404)] {
        let r = app
            .http
            .get(app.url(&format!("/v1/jobs/{alice_buy}")))
            .header("X-Sparky-Secret", secret.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
    }
    let (s, v) = get(&app, &format!("/v1/jobs/{alice_buy}"), &alice_token).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["orders"][0]["leg"], "open");
    // No token is ever logged.
    assert!(!captured_logs().contains(&alice_token));
    app.cleanup().await;
}

/// Jobs as a worker records them when it begins them (fast: no broker, no stream).
async fn begin_jobs(app: &TestApp, user: Uuid, secret: &str, n: usize) -> Vec<Uuid> {
    let mut ids = vec![];
    for i in 0..n {
        let mut body = alert(user, secret, if i % 2 == 0 { "buy" } else { "close" });
        if i % 3 == 0 {
            body["symbol"] = json!("BTCUSDT");
        }
        let alert = sparky::domain::parse_alert(body.as_object().unwrap(), None).unwrap();
        let job = sparky::domain::Job {
            job_id: Uuid::now_v7(),
            accepted_at: chrono::Utc::now(),
            alert,
        };
        app.store.begin_job(&job, 0, "0-1").await.unwrap();
        ids.push(job.job_id);
    }
    ids
}

#[tokio::test]
async fn job_pages_are_stable_while_new_jobs_arrive() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let token = token_for(&app, user).await;
    let mut first = begin_jobs(&app, user, &secret, 8).await;
    first.reverse(); // newest first

    let (s, p1) = get(&app, "/v1/jobs?limit=3", &token).await;
    assert_eq!(s, 200, "{p1}");
    let mut seen = ids(&p1, "job_id");
    let mut cursor = p1["next_cursor"].as_str().unwrap().to_string();
    // New jobs arrive between every page: none appears in a later page, nothing repeats or is skipped.
    let mut arrived = vec![];
    loop {
        arrived.extend(begin_jobs(&app, user, &secret, 2).await);
        let (s, p) = get(&app, &format!("/v1/jobs?limit=3&cursor={cursor}"), &token).await;
        assert_eq!(s, 200, "{p}");
        seen.extend(ids(&p, "job_id"));
        match p["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => break,
        }
    }
    let want: Vec<String> = first.iter().map(Uuid::to_string).collect();
    assert_eq!(
        seen, want,
        "the pages are exactly the jobs that existed, newest first"
    );
    // A new first page starts with the jobs that arrived meanwhile.
    let (_, p) = get(&app, "/v1/jobs?limit=1", &token).await;
    assert_eq!(ids(&p, "job_id"), [arrived.last().unwrap().to_string()]);

    // Filters.
    let (_, p) = get(&app, "/v1/jobs?symbol=binance:btcusdt&limit=200", &token).await;
    assert!(!ids(&p, "job_id").is_empty());
    assert!(p["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|j| j["symbol"] == "BTCUSDT"));
    let (_, p) = get(
        &app,
        "/v1/jobs?status=executing,queued&exchange=PAPER&limit=200",
        &token,
    )
    .await;
    assert_eq!(ids(&p, "job_id").len(), first.len() + arrived.len());
    let (_, p) = get(&app, "/v1/jobs?status=dead", &token).await;
    assert!(ids(&p, "job_id").is_empty());
    let (_, p) = get(&app, "/v1/jobs?since=2099-01-01T00:00:00Z&status=", &token).await;
    assert!(ids(&p, "job_id").is_empty(), "{p}");

    // Bad input: 400 naming each parameter, never a 500.
    for (query, field) in [
        ("status=exploded", "status"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("since=yesterday", "since"),
        ("exchange=nyse", "exchange"),
        ("symbol=ETH%20USDT", "symbol"),
        ("sort=asc", "sort"),
        ("limit=1&limit=2", "limit"),
    ] {
        let (s, v) = get(&app, &format!("/v1/jobs?{query}"), &token).await;
        assert_eq!(s, 400, "{query}: {v}");
        assert_eq!(v["field"], field, "{query}: {v}");
    }
    // A trades cursor is not a jobs cursor.
    let (_, v) = get(&app, "/v1/trades?limit=1", &token).await;
    assert!(v["next_cursor"].is_null(), "no trades: {v}");
    let (s, v) = get(&app, &format!("/v1/trades?cursor={cursor}"), &token).await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("cursor"))
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_user_replays_their_dead_job_and_not_a_succeeded_one() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let token = token_for(&app, user).await;
    // A lagging alert: its own timestamp + max_lag_secs is already past, so it goes dead (stale).
    let mut lagging = alert(user, &secret, "buy");
    lagging["timestamp"] = json!(chrono::Utc::now().timestamp_millis() - 120_000);
    lagging["max_lag_secs"] = json!(30);
    let dead = app.enqueue(&lagging).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(dead).await.status.as_str(), "dead");
    let (_, dl) = get(&app, "/v1/dead-letters", &token).await;
    assert_eq!(ids(&dl, "job_id"), [dead.to_string()]);

    // Bad bodies name the field.
    let (s, v) = replay(&app, dead, &token, Some(json!({"allow_stale": "yes"}))).await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("allow_stale")),
        "{v}"
    );
    let (s, v) = replay(&app, dead, &token, Some(json!({"allowStale": true}))).await;
    assert_eq!(
        (s, v["field"].clone()),
        (StatusCode::BAD_REQUEST, json!("allowStale")),
        "{v}"
    );

    // The stale rule of `sparky replay`: refused without the override...
    let (s, v) = replay(&app, dead, &token, None).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["decision"], "would_be_stale");
    assert!(v["error"].as_str().unwrap().contains("allow_stale"), "{v}");
    assert_eq!(app.job(dead).await.status.as_str(), "dead");
    // ...and run with it, once.
    let (s, v) = replay(&app, dead, &token, Some(json!({"allow_stale": true}))).await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["status"], "queued");
    app.run_worker_until_idle().await;
    assert_eq!(app.job(dead).await.status.as_str(), "succeeded");
    assert_eq!(app.trades(user).await.len(), 1);

    // A succeeded job is refused (the same job now, and a job that succeeded first time).
    let ok = app.enqueue(&alert(user, &secret, "close")).await;
    app.run_worker_until_idle().await;
    for job in [dead, ok] {
        let (s, v) = replay(&app, job, &token, Some(json!({"allow_stale": true}))).await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["decision"], "not_failed");
        assert_eq!(v["status"], "succeeded");
    }
    app.run_worker_until_idle().await;
    assert_eq!(app.trades(user).await.len(), 2, "nothing ran again");
    app.cleanup().await;
}

/// Every route the ingress serves, as (method, path template).
const SERVED: [(&str, &str); 11] = [
    ("post", "/webhook"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{job_id}"),
    ("post", "/v1/jobs/{job_id}/replay"),
    ("get", "/v1/positions"),
    ("get", "/v1/trades"),
    ("get", "/v1/dead-letters"),
    ("get", "/openapi.json"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap().to_string());
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_openapi_document_is_valid_3_1_and_names_every_served_route() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();

    // Structure of an OpenAPI 3.1 document.
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    let mut all_refs = vec![];
    refs(&doc, &mut all_refs);
    assert!(!all_refs.is_empty());
    for r in &all_refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("a local schema ref: {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    let mut op_ids = BTreeSet::new();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        assert!(path.starts_with('/'), "{path}");
        for (method, op) in item.as_object().unwrap() {
            documented.insert((method.clone(), path.clone()));
            assert!(
                op_ids.insert(op["operationId"].as_str().unwrap().to_string()),
                "unique operationId"
            );
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for (code, resp) in responses {
                assert!(code.len() == 3 && code.parse::<u16>().is_ok(), "{code}");
                assert!(resp["description"].is_string(), "{method} {path} {code}");
            }
            // Every template parameter is declared as a required path parameter.
            for seg in path.split('/').filter(|s| s.starts_with('{')) {
                let name = seg.trim_matches(['{', '}']);
                let declared = op["parameters"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|p| p["name"] == name && p["in"] == "path" && p["required"] == true);
                assert!(declared, "{method} {path}: path parameter {name}");
            }
            for req in op["security"].as_array().into_iter().flatten() {
                for scheme in req.as_object().unwrap().keys() {
                    assert!(
                        schemes.contains_key(scheme),
                        "{method} {path}: scheme {scheme}"
                    );
                }
            }
            // Every /v1 route documents its error shapes.
            if path.starts_with("/v1") {
                for code in ["401", "503"] {
                    assert!(responses.contains_key(code), "{method} {path}: {code}");
                }
            }
        }
    }

    // The full OpenAPI 3.1 schema check, where the reference validator is installed
    // (`pip install openapi-spec-validator`); the structural checks above run everywhere.
    let has_validator = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .status()
        .is_ok_and(|s| s.success());
    if has_validator {
        let path = std::env::temp_dir().join(format!("sparky-openapi-{}.json", Uuid::now_v7()));
        std::fs::write(&path, serde_json::to_vec(&doc).unwrap()).unwrap();
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, json; from openapi_spec_validator import validate; from openapi_spec_validator.validation import OpenAPIV31SpecValidator; validate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)",
            ])
            .arg(&path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            out.status.success(),
            "openapi-spec-validator: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("openapi-spec-validator is not installed: only the structural checks ran");
    }

    // The document and the served routes are the same set...
    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
    // ...and every documented route is served (not the router's fallback, not a 405).
    for (method, path) in &documented {
        let url = app.url(&path.replace("{job_id}", &Uuid::now_v7().to_string()));
        let r = app
            .http
            .request(method.to_uppercase().parse().unwrap(), url)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}");
        assert!(!body.contains("no such route"), "{method} {path}: {body}");
    }
    // While a path nobody serves is the fallback.
    let r = app.http.get(app.url("/v1/orders")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("no such route"));
    app.cleanup().await;
}
