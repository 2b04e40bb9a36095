//! Webhooks as the Standard Webhooks spec has them: each message is a JSON body
//! `{type, timestamp, data}` POSTed with `webhook-id` (the message's id, the same on every
//! attempt, so a receiver keeps one logical delivery), `webhook-timestamp` (unix seconds)
//! and `webhook-signature` (`v1,` + base64 HMAC-SHA256 of `id.timestamp.body` keyed with
//! the secret's bytes).
//!
//! Messages wait in the `webhook_deliveries` table, so none is lost when an instance
//! stops. [`Deliverer`] takes due ones by compare-and-set (one instance per attempt),
//! sends, logs the attempt and schedules the next one: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h
//! and 10 h after the attempts before it (a day and a few hours in all), after which the
//! delivery is `failed` until a user redelivers it. A 2xx answer delivers; `410 Gone`
//! fails at once (the receiver asks not to be called again).
//!
//! Targets on loopback, private, link-local or otherwise internal addresses are refused
//! unless `allow_private_targets` is set, so a user cannot aim Apex at the network it
//! runs in. Redirects are not followed.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::clock::now_ms;
use crate::settings::WebhookSettings;
use crate::store::{DeliveryNext, DueDelivery, Store, WebhookAttemptRecord};
use crate::telemetry;

type HmacSha256 = Hmac<Sha256>;

/// A new signing secret: `whsec_` and 32 random bytes in base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The `webhook-signature` value of `body` sent as message `id` at `timestamp`.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> String {
    let key = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap_or_else(|_| key.as_bytes().to_vec());
    let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes a key of any length");
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Checks a webhook URL as given: `http(s)`, a host, no credentials, at most 2,000
/// characters; and, unless private targets are allowed, not an internal address literal
/// (names are checked again when each attempt resolves them).
pub fn check_url(url: &str, allow_private: bool) -> Result<reqwest::Url, String> {
    if url.len() > 2_000 {
        return Err("url must be at most 2000 characters".into());
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("url is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("url must be http:// or https://".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("url must not carry credentials; verify the signature instead".into());
    }
    let Some(host) = parsed.host_str().filter(|h| !h.is_empty()) else {
        return Err("url needs a host".into());
    };
    if !allow_private {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let literal = if bare.eq_ignore_ascii_case("localhost") {
            Some(IpAddr::from([127, 0, 0, 1]))
        } else {
            bare.parse::<IpAddr>().ok()
        };
        if literal.is_some_and(is_internal) {
            return Err("url must not point at a loopback, private or link-local address".into());
        }
    }
    Ok(parsed)
}

/// Loopback, private, link-local, shared (CGNAT), unspecified, multicast or documentation
/// space: nothing a public receiver lives on.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Sends due webhook messages; one per instance, all sharing the queue in the database.
pub struct Deliverer {
    store: Arc<dyn Store>,
    client: reqwest::Client,
    settings: WebhookSettings,
}

/// At most this many deliveries are taken per pass.
const BATCH: i64 = 32;

impl Deliverer {
    pub fn new(store: Arc<dyn Store>, settings: WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("apex-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            store,
            client,
            settings,
        })
    }

    /// Takes and sends every delivery due now (several at once). How many were sent.
    pub async fn deliver_due(self: &Arc<Self>) -> usize {
        let now = now_ms();
        let due = match self.store.due_deliveries(now, BATCH).await {
            Ok(due) => due,
            Err(err) => {
                tracing::error!(error = %err, "reading due webhook deliveries failed");
                return 0;
            }
        };
        // Leased for an attempt's longest time and a margin: a crash mid-attempt leaves
        // the delivery due again once the lease ends.
        let lease =
            now + i64::try_from(self.settings.timeout.as_millis()).unwrap_or(15_000) + 30_000;
        let mut sending = tokio::task::JoinSet::new();
        for due in due {
            match self
                .store
                .claim_delivery(&due.delivery.id, due.delivery.next_attempt_at_ms, lease)
                .await
            {
                Ok(true) => {
                    let this = Arc::clone(self);
                    sending.spawn(async move { this.attempt(due).await });
                }
                Ok(false) => {} // another instance took it
                Err(err) => tracing::error!(error = %err, "claiming a webhook delivery failed"),
            }
        }
        let mut sent = 0;
        while sending.join_next().await.is_some() {
            sent += 1;
        }
        sent
    }

    /// One attempt of a delivery this instance took.
    async fn attempt(&self, due: DueDelivery) {
        let d = &due.delivery;
        let number = d.attempts + 1;
        let started = Instant::now();
        let at_ms = now_ms();
        let outcome = self.send(&due).await;
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        metrics::histogram!(telemetry::WEBHOOK_DURATION).record(started.elapsed().as_secs_f64());
        let (status_code, error) = match &outcome {
            Ok(status) => (Some(i64::from(*status)), None),
            Err(err) => (None, Some(err.clone())),
        };
        let next = match outcome {
            Ok(status) if (200..300).contains(&status) => DeliveryNext::Delivered(now_ms()),
            Ok(410) => DeliveryNext::Failed,
            _ => {
                // Attempts made in this schedule (since the last redelivery).
                let made = usize::try_from(number - d.schedule_start).unwrap_or(usize::MAX);
                match self.settings.retry_delays.get(made.saturating_sub(1)) {
                    Some(delay) => DeliveryNext::RetryAt(
                        now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                    ),
                    None => DeliveryNext::Failed,
                }
            }
        };
        let result = match next {
            DeliveryNext::Delivered(_) => "delivered",
            DeliveryNext::RetryAt(_) => "retry",
            DeliveryNext::Failed => "failed",
        };
        metrics::counter!(telemetry::WEBHOOK_ATTEMPTS, "result" => result).increment(1);
        let attempt = WebhookAttemptRecord {
            attempt: number,
            at_ms,
            status_code,
            error,
            duration_ms,
        };
        if let Err(err) = self
            .store
            .finish_delivery_attempt(&d.id, &attempt, next)
            .await
        {
            // The lease ends and the delivery is attempted again: at least once.
            tracing::error!(error = %err, delivery = %d.id, "recording a webhook attempt failed");
        }
    }

    /// POSTs the message; the receiver's status, or why there was none.
    async fn send(&self, due: &DueDelivery) -> Result<u16, String> {
        let url = check_url(&due.url, self.settings.allow_private_targets)?;
        if !self.settings.allow_private_targets {
            let host = url.host_str().unwrap_or_default().to_string();
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("could not resolve {host}: {e}"))?;
            if addrs.into_iter().any(|a| is_internal(a.ip())) {
                return Err(format!("{host} resolves to an internal address"));
            }
        }
        let d = &due.delivery;
        let timestamp = now_ms() / 1000;
        let signature = sign(&due.secret, &d.id, timestamp, &d.payload);
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    "timed out".to_string()
                } else if e.is_connect() {
                    "could not connect".to_string()
                } else {
                    "request failed".to_string()
                }
            })?;
        Ok(response.status().as_u16())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_standard_webhooks_test_vector() {
        // The spec's example: secret, id, timestamp and body, and the signature they give.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn internal_targets_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:8080/hook",
            "http://localhost/hook",
            "http://10.1.2.3/",
            "http://192.168.0.10/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://100.64.0.1/",
        ] {
            assert!(check_url(url, false).is_err(), "{url} must be refused");
            assert!(
                check_url(url, true).is_ok(),
                "{url} allowed when private targets are"
            );
        }
        assert!(check_url("https://hooks.example.com/apex", false).is_ok());
        assert!(check_url("ftp://example.com/", true).is_err());
        assert!(check_url("https://user:pw@example.com/", true).is_err());
        assert!(check_url("not a url", true).is_err());
    }
}
