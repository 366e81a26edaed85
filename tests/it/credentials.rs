//! Credential loading: Redis cache (ciphertext only, TTL) in front of Postgres, Postgres as fallback.

use std::time::Duration;

use sparky::credentials::CredentialLoader;
use sparky::domain::ExchangeKind;
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
