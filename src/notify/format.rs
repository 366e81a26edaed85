//! What each channel receives, and the Standard Webhooks signature of the generic webhook.
//!
//! - generic webhook: the event envelope as JSON, signed per the Standard Webhooks spec:
//!   `webhook-id` (the event id: the same on every retry, receivers deduplicate on it),
//!   `webhook-timestamp` (unix seconds of this attempt) and
//!   `webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the
//!   base64-decoded part of the channel's `whsec_` secret;
//! - Discord: `{"content": text}`; Slack: `{"text": text}`; Telegram `sendMessage`:
//!   `{"chat_id", "text"}`. The text is one line saying what happened, from [`summary`].

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::Value;
use sha2::Sha256;
use zeroize::Zeroize;

use crate::secrets::SecretString;

/// A new `whsec_` signing secret (24 random bytes, base64), as Standard Webhooks libraries expect.
pub fn generate_signing_secret() -> SecretString {
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    let s = SecretString::new(format!("whsec_{}", B64.encode(b)));
    b.zeroize();
    s
}

/// Is `s` a usable `whsec_` secret? The error says what is wrong (never the secret).
pub fn check_signing_secret(s: &str) -> Result<(), String> {
    let Some(b64) = s.strip_prefix("whsec_") else {
        return Err("must start with `whsec_` (Standard Webhooks secret)".into());
    };
    match B64.decode(b64) {
        Ok(k) if k.len() >= 16 => Ok(()),
        Ok(_) => Err("the key after `whsec_` must be at least 16 bytes".into()),
        Err(_) => Err("the part after `whsec_` must be base64".into()),
    }
}

/// The `webhook-signature` header value for one message.
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    check_signing_secret(secret)?;
    let mut key = B64
        .decode(&secret["whsec_".len()..])
        .map_err(|_| "the part after `whsec_` must be base64".to_string())?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
    key.zeroize();
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", B64.encode(mac.finalize().into_bytes())))
}

/// Does `signature` (a header with one or more space-separated `v1,<sig>`) match? For receivers
/// and tests; constant-time comparison.
pub fn verify(secret: &str, msg_id: &str, timestamp: i64, body: &[u8], signature: &str) -> bool {
    use subtle::ConstantTimeEq;
    let Ok(expected) = sign(secret, msg_id, timestamp, body) else {
        return false;
    };
    signature
        .split(' ')
        .any(|s| bool::from(s.as_bytes().ct_eq(expected.as_bytes())))
}

/// One line for a chat channel, from the event envelope.
pub fn summary(event: &Value) -> String {
    let kind = event["type"].as_str().unwrap_or("event");
    let d = &event["data"];
    let text = |k: &str| d[k].as_str().unwrap_or("").to_string();
    let icon = match kind {
        "filled" => "✅",
        "unprotected" => "⚠️",
        "rejected" | "dead" => "❌",
        "blocked" => "⛔",
        "stop_loss_fired" | "take_profit_fired" => "🎯",
        "test" => "🔔",
        _ => "ℹ️",
    };
    let what = format!(
        "{} {} on {}",
        text("action"),
        text("symbol"),
        text("exchange")
    );
    let mut line = format!("{icon} Sparky: {kind}");
    if !what.trim().replace(" on", "").is_empty() {
        line.push_str(&format!(": {}", what.trim()));
    }
    if let Some(fills) = d["fills"].as_array() {
        let legs: Vec<String> = fills
            .iter()
            .map(|f| {
                let price = f["price"]
                    .as_str()
                    .map(|p| format!(" @ {p}"))
                    .unwrap_or_default();
                format!(
                    "{} {} {}{price}",
                    f["leg"].as_str().unwrap_or(""),
                    f["side"].as_str().unwrap_or(""),
                    f["quantity"].as_str().unwrap_or("")
                )
            })
            .collect();
        if !legs.is_empty() {
            line.push_str(&format!(" ({})", legs.join(", ")));
        }
    }
    if let Some(e) = d["error"].as_str().filter(|e| !e.is_empty()) {
        let e: String = e.chars().take(300).collect();
        line.push_str(&format!(" - {e}"));
    }
    if let Some(j) = d["job_id"].as_str() {
        line.push_str(&format!(" [job {j}]"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector of the Standard Webhooks reference libraries.
    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sig = sign(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            &format!("v1,bogus {sig}")
        ));
        assert!(!verify(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            br#"{"test": 2432232314}"#,
            &sig
        ));
    }

    #[test]
    fn generated_secrets_are_valid_and_bad_ones_are_named() {
        let s = generate_signing_secret();
        assert!(check_signing_secret(s.expose()).is_ok());
        assert!(format!("{s:?}").contains("redacted"));
        assert!(check_signing_secret("abc").unwrap_err().contains("whsec_"));
        assert!(check_signing_secret("whsec_!!").is_err());
    }

    #[test]
    fn summaries_say_what_happened() {
        let ev = serde_json::json!({"type": "dead", "data": {"action": "buy", "symbol": "ETHUSDT",
            "exchange": "paper", "error": "stale: too old", "job_id": "j1", "fills": []}});
        assert_eq!(
            summary(&ev),
            "❌ Sparky: dead: buy ETHUSDT on paper - stale: too old [job j1]"
        );
    }
}
