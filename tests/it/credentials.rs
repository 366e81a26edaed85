//! Credential loading: Redis cache (ciphertext only, TTL) in front of Postgres, Postgres as fallback.

use std::time::Duration;

use sparky::credentials::CredentialLoader;
use sparky::domain::{CredentialEnv, ExchangeKind};
use sparky::queue::Queue;
use sparky::secrets::MasterKey;

use crate::helpers::*;

#[tokio::test]
async fn the_cache_holds_ciphertext_with_a_ttl_and_postgres_is_the_fallback() {
    let key = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
    let k2 = key.clone();
    let app = TestApp::spawn_with(move |c| c.master_key = Some(k2)).await;
    let (user, _) = app.paper_user().await;
    let loader = CredentialLoader::new(
        app.store.clone(),
        app.queue.clone(),
        Duration::from_secs(60),
        vec![key.clone()],
    );
    let creds = loader
        .load(user, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(creds.api_secret.expose(), format!("secret-{user}"));
    assert_eq!(creds.label.as_deref(), Some("Main Account"));
    assert_eq!(format!("{creds:?}").matches("[redacted]").count(), 2);

    let cache_key = app.queue.keys.credentials(&user, "paper", "default");
    let mut c = app.queue.conn();
    let cached: String = redis::cmd("GET")
        .arg(&cache_key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        !cached.contains(&format!("secret-{user}")),
        "plaintext in the cache: {cached}"
    );
    assert!(cached.contains("enc:v1:"));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&cache_key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=60).contains(&ttl), "ttl {ttl}");

    // Served from the cache: a change in Postgres is not seen until the entry expires...
    sqlx::query("UPDATE bot_credentials SET label = 'renamed' WHERE user_id = $1")
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let again = loader
        .load(user, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.label.as_deref(), Some("Main Account"));

    // ...and with the cache unavailable, Postgres answers.
    let mut dead = PrivateRedis::start().await;
    let dead_queue = Queue::connect(
        &dead.url(),
        &app.config.namespace,
        4,
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    dead.kill();
    let fallback = CredentialLoader::new(
        app.store.clone(),
        dead_queue,
        Duration::from_secs(60),
        vec![key],
    );
    let fresh = fallback
        .load(user, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.label.as_deref(), Some("renamed"));
    assert_eq!(fresh.api_key.expose(), format!("key-{user}"));

    // No row: None (the worker turns it into a clear rejection).
    assert!(loader
        .load(user, ExchangeKind::Aster, None)
        .await
        .unwrap()
        .is_none());
    app.cleanup().await;
}

/// `sparky credentials set` as an operator runs it, the secrets never on the command line: read from
/// standard input with `-`, or from `SPARKY_API_KEY` / `SPARKY_API_SECRET`.
#[tokio::test]
async fn credentials_set_reads_secrets_from_stdin_or_the_environment() {
    use std::io::Write;
    use std::process::{Command, Stdio};

    let master_b64 = MasterKey::generate_base64();
    let key = MasterKey::from_base64(&master_b64).unwrap();
    let app = TestApp::spawn().await;
    let (user, _) = app.create_user().await;
    let run = |args: &[&str], env: &[(&str, &str)], stdin: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sparky"));
        cmd.args(args)
            // Not the checkout: no `.env` is read.
            .current_dir(std::env::temp_dir())
            .env_remove("SPARKY_API_KEY")
            .env_remove("SPARKY_API_SECRET")
            .env("DATABASE_URL", &app.config.database_url)
            .env("REDIS_URL", &app.config.redis_url)
            .env("SPARKY_NAMESPACE", &app.config.namespace)
            .env("SPARKY_PARTITIONS", app.config.partitions.to_string())
            .env("SPARKY_MASTER_KEY", &master_b64)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let user_s = user.to_string();
    let base = [
        "credentials",
        "set",
        "--user",
        &user_s,
        "--exchange",
        "paper",
        "--environment",
        "sandbox",
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    let loader = CredentialLoader::new(
        app.store.clone(),
        app.queue.clone(),
        Duration::from_secs(60),
        vec![key],
    );
    let stored = || {
        let loader = loader.clone();
        async move {
            let c = loader
                .load(user, ExchangeKind::Paper, Some(CredentialEnv::Sandbox))
                .await
                .unwrap()
                .unwrap();
            (
                c.api_key.expose().to_string(),
                c.api_secret.expose().to_string(),
            )
        }
    };

    // Both from standard input: the key on the first line, the secret on the second.
    let out = run(
        &with(&["--api-key", "-", "--api-secret", "-"]),
        &[],
        "stdin-key\nstdin-secret\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stored().await,
        ("stdin-key".to_string(), "stdin-secret".to_string())
    );
    let raw: String =
        sqlx::query_scalar("SELECT api_secret FROM bot_credentials WHERE user_id = $1")
            .bind(user)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert!(raw.starts_with("enc:v1:"), "encrypted at rest: {raw}");

    // The key on the command line (not secret for every broker), the secret from stdin. (The CLI
    // drops the cached row itself.)
    let out = run(
        &with(&["--api-key", "visible-key", "--api-secret", "-"]),
        &[],
        "piped-secret",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stored().await,
        ("visible-key".to_string(), "piped-secret".to_string())
    );

    // From the environment.
    let out = run(
        &base,
        &[
            ("SPARKY_API_KEY", "env-key"),
            ("SPARKY_API_SECRET", "env-secret"),
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stored().await,
        ("env-key".to_string(), "env-secret".to_string())
    );

    // `-` with nothing on standard input: refused, naming the flag; the row is unchanged.
    let out = run(&with(&["--api-key", "k", "--api-secret", "-"]), &[], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--api-secret"), "{err}");
    assert_eq!(
        stored().await,
        ("env-key".to_string(), "env-secret".to_string())
    );
    app.cleanup().await;
}

/// `encrypt-existing` reads the plaintext rows, then writes each one back encrypted only if it
/// still holds what was read. Here a concurrent writer changes a row between the read and the
/// write (it holds the row lock until `encrypt-existing` is waiting on it): that row is skipped and
/// reported, the concurrent write survives, and the other rows are encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_existing_never_overwrites_a_concurrent_write() {
    use sparky::credentials::seal_row;
    use sparky::store::CredentialRow;

    let key = MasterKey::from_base64(&MasterKey::generate_base64()).unwrap();
    let app = TestApp::spawn().await;
    let (raced, _) = app.create_user().await;
    let (calm, _) = app.create_user().await;
    for u in [raced, calm] {
        sqlx::query(
            "INSERT INTO bot_credentials (user_id, exchange, api_key, api_secret, environment)
             VALUES ($1, 'paper', 'old-plain-key', 'old-plain-secret', 'production')",
        )
        .bind(u)
        .execute(&app.store.pool)
        .await
        .unwrap();
    }

    // The concurrent writer (`credentials set` with new values): holds the row locked, uncommitted.
    let mut newer = CredentialRow {
        user_id: raced,
        exchange: "paper".into(),
        api_key: "new-key".into(),
        api_secret: "new-secret".into(),
        account_id: None,
        environment: "production".into(),
        extra_config: serde_json::json!({}),
        label: None,
    };
    seal_row(&mut newer, Some(&key));
    let mut tx = app.store.pool.begin().await.unwrap();
    sqlx::query("UPDATE bot_credentials SET api_key = $2, api_secret = $3 WHERE user_id = $1")
        .bind(raced)
        .bind(&newer.api_key)
        .bind(&newer.api_secret)
        .execute(&mut *tx)
        .await
        .unwrap();

    // encrypt-existing reads both rows (still plaintext for it) and blocks writing the raced one.
    let store = app.store.clone();
    let k = key.clone();
    let run = tokio::spawn(async move { sparky::cli::encrypt_existing(&store, &k).await });
    let db: String = sqlx::query_scalar("SELECT current_database()::text")
        .fetch_one(&app.store.pool)
        .await
        .unwrap();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND wait_event_type = 'Lock' AND query LIKE 'UPDATE bot_credentials%'",
        )
        .bind(&db)
        .fetch_one(&app.store.pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            !run.is_finished(),
            "encrypt-existing finished without waiting on the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.commit().await.unwrap();
    let report = run.await.unwrap().unwrap();

    let raced_id: i64 = sqlx::query_scalar("SELECT id FROM bot_credentials WHERE user_id = $1")
        .bind(raced)
        .fetch_one(&app.store.pool)
        .await
        .unwrap();
    assert_eq!(report.skipped, vec![raced_id], "{report:?}");
    // Both rows were read as plaintext; only the calm one was written.
    assert_eq!(report.encrypted, 1, "{report:?}");
    let loader = CredentialLoader::new(
        app.store.clone(),
        app.queue.clone(),
        Duration::from_secs(60),
        vec![key.clone()],
    );
    let r = loader
        .load(raced, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (r.api_key.expose(), r.api_secret.expose()),
        ("new-key", "new-secret"),
        "the concurrent write survived"
    );
    let c = loader
        .load(calm, ExchangeKind::Paper, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.api_secret.expose(), "old-plain-secret");
    let stored: String =
        sqlx::query_scalar("SELECT api_secret FROM bot_credentials WHERE user_id = $1")
            .bind(calm)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert!(stored.starts_with("enc:v1:"), "{stored}");
    app.cleanup().await;
}
