//! What the three HTTP clients share: sending a request and mapping what comes back into the error
//! taxonomy of [`super::ExchangeError`], `Retry-After` parsing, and exact decimal parsing of the
//! brokers' JSON.
//!
//! Whether a failure is `Transient` or `Unknown` depends on whether the request could have changed
//! anything at the broker: a failed read (`Call::Read`) is always safe to repeat, so a timeout or a
//! 503 on a read is `Transient`; on a write (`Call::Write`, an order) the same failure means the order
//! may exist, so it is `Unknown` and the executor looks the order up before anything is resent.
//! Connect errors are `Transient` for both: nothing reached the broker.
//!
//! Error messages never contain credentials: reqwest errors are stripped of their URL (Aster signs
//! in the query string) and no header is ever printed.

use std::str::FromStr;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use rust_decimal::Decimal;
use serde_json::Value;

use super::{ErrorClass, ExchangeError};

/// Never wait longer than this because a broker asked us to.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Whether a call can change state at the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    Read,
    Write,
}

/// A response that arrived: status, headers and the parsed JSON body (`Value::Null` when the body
/// is empty or not JSON; `text` keeps the raw text for messages).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

/// Send `req` and read the whole body. Failures to get a reply are classified by `call`.
///
/// Every broker request of every client passes here, so this is where the partition's lease is
/// asked first ([`crate::partition::fence`]): inside a worker's job, a request that could not finish
/// before the lease validity ends is not sent (a transient error; the executor then stops, and the
/// partition's next owner finishes the job).
pub async fn send(
    exchange: &str,
    req: reqwest::RequestBuilder,
    call: Call,
) -> Result<Reply, ExchangeError> {
    crate::partition::fence::request_permit()
        .await
        .map_err(|v| ExchangeError::transient(format!("{exchange}: {v}")))?;
    let resp = req
        .send()
        .await
        .map_err(|e| transport_error(exchange, e, call))?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| transport_error(exchange, e, call))?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Ok(Reply {
        status,
        headers,
        json,
        text,
    })
}

/// Map a reqwest failure. A connect failure (including a connect timeout) never reached the broker.
pub fn transport_error(exchange: &str, e: reqwest::Error, call: Call) -> ExchangeError {
    let connect = e.is_connect();
    let timeout = e.is_timeout();
    let e = e.without_url();
    let cause = error_chain(&e);
    if connect {
        return ExchangeError::transient(format!("{exchange}: could not connect: {cause}"));
    }
    let what = if timeout {
        "no reply in time"
    } else {
        "the connection failed before a reply"
    };
    let message = format!("{exchange}: {what} ({cause})");
    match call {
        Call::Read => ExchangeError::transient(message),
        Call::Write => ExchangeError::unknown(format!("{message}; the order may have been placed")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = c.source();
    }
    s
}

/// The class an HTTP status implies on its own, before looking at the body: `None` for 2xx.
/// 429/418 (rate limited, IP ban) and 5xx are transient; 503 on a write is an unknown outcome;
/// other 4xx are permanent.
pub fn status_class(status: StatusCode, call: Call) -> Option<ErrorClass> {
    if status.is_success() {
        return None;
    }
    Some(match status.as_u16() {
        429 | 418 | 408 => ErrorClass::Transient,
        503 | 504 if call == Call::Write => ErrorClass::Unknown,
        500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    })
}

/// The error for a non-2xx reply, with `message` (the broker's own words) and `Retry-After`.
pub fn status_error(exchange: &str, reply: &Reply, call: Call, message: &str) -> ExchangeError {
    let class = status_class(reply.status, call).unwrap_or(ErrorClass::Permanent);
    let mut message = format!(
        "{exchange} answered HTTP {}: {message}",
        reply.status.as_u16()
    );
    if class == ErrorClass::Unknown {
        message.push_str("; the order may have been placed");
    }
    ExchangeError {
        class,
        message,
        retry_after: retry_after(&reply.headers),
    }
}

/// `Retry-After` as seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    parse_retry_after(v, chrono::Utc::now())
}

pub fn parse_retry_after(v: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = Decimal::from_str(v) {
        // Some servers send fractional seconds.
        let ms = (secs * Decimal::ONE_THOUSAND).trunc();
        Duration::from_millis(u64::try_from(ms).ok()?)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        (at.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or_default()
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// An exact decimal from a JSON string (`"0.00100000"`) or number (kept as its literal text by
/// `serde_json`'s `arbitrary_precision`; never through `f64`).
pub fn dec(v: &Value) -> Option<Decimal> {
    let s = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Decimal::from_str(&s)
        .or_else(|_| Decimal::from_scientific(&s))
        .ok()
}

/// The field `key` of `v` as a decimal, or a `Permanent`-free "unexpected reply" error.
pub fn dec_field(exchange: &str, v: &Value, key: &str) -> Result<Decimal, ExchangeError> {
    dec(&v[key]).ok_or_else(|| unexpected(exchange, &format!("`{key}` is not a decimal")))
}

/// A reply we could not understand. On a read this is transient (ask again); callers that parse the
/// reply to a write turn it into an unknown outcome themselves.
pub fn unexpected(exchange: &str, what: &str) -> ExchangeError {
    ExchangeError::transient(format!("{exchange}: unexpected reply: {what}"))
}

/// The text of a JSON string or number (ids arrive as either).
pub fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Strip a trailing `/` and an optional API version suffix (`/v1`, `/v3`) from a configured base
/// URL, so `https://api.tradier.com` and `https://api.tradier.com/v1` both work.
pub fn base_url(url: &str, version: &str) -> String {
    let u = url.trim().trim_end_matches('/');
    u.strip_suffix(version).unwrap_or(u).to_string()
}

/// The first `n` characters of a reply body, for error messages.
pub fn snippet(text: &str) -> String {
    const N: usize = 300;
    let t = text.trim();
    if t.chars().count() <= N {
        t.to_string()
    } else {
        format!("{}...", t.chars().take(N).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(dec(&json!("0.00100000")), Some(dec!(0.001)));
        assert_eq!(
            dec(&serde_json::from_str::<Value>("190.123456789012345678").unwrap()),
            Some(dec!(190.123456789012345678))
        );
        assert_eq!(dec(&json!("-12.5")), Some(dec!(-12.5)));
        assert_eq!(dec(&json!("1e-3")), Some(dec!(0.001)));
        assert_eq!(dec(&json!(null)), None);
        assert_eq!(dec(&json!("abc")), None);
    }

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(parse_retry_after("100000", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn status_classes() {
        let c = |s: u16, call| status_class(StatusCode::from_u16(s).unwrap(), call);
        assert_eq!(c(200, Call::Write), None);
        assert_eq!(c(429, Call::Write), Some(ErrorClass::Transient));
        assert_eq!(c(418, Call::Read), Some(ErrorClass::Transient));
        assert_eq!(c(500, Call::Write), Some(ErrorClass::Transient));
        assert_eq!(c(503, Call::Write), Some(ErrorClass::Unknown));
        assert_eq!(c(503, Call::Read), Some(ErrorClass::Transient));
        assert_eq!(c(400, Call::Write), Some(ErrorClass::Permanent));
        assert_eq!(c(401, Call::Read), Some(ErrorClass::Permanent));
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("https://api.tradier.com/v1/", "/v1"),
            "https://api.tradier.com"
        );
        assert_eq!(base_url("http://127.0.0.1:5/", "/v3"), "http://127.0.0.1:5");
    }
}
