//! Fair limits: per-user rate limits, connection caps and login throttling.
//!
//! These are the only shared structures keyed by user: they hold counters, never user
//! data, and every entry disappears when it is no longer needed (a connection or completion
//! guard drops its count; a rate bucket that refilled completely is pruned). Limits count across all of
//! a user's connections and requests, because the key is the authenticated user id, not
//! the connection. (Concurrent-run and busy-thread limits live with the running runs, in
//! `run::registry`, where the check and the reservation happen under one lock.)
//!
//! With several instances (a Redis bus configured), the rate limits are kept in Redis by
//! [`shared`], so they hold across instances; the in-process buckets then only stand in
//! while Redis does not answer. Connection and completion caps stay per instance (they
//! guard this instance's sockets and its local model).

pub mod shared;

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::UserId;
pub use crate::settings::LimitSettings;

/// A token bucket per key: `burst` tokens, refilled at `per_second`.
struct RateLimiter<K> {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

/// How many buckets may exist before full ones are pruned.
const PRUNE_AT: usize = 4096;

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    fn new(burst: u32, per: Duration, count: u32) -> Self {
        Self {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(count.max(1)) / per.as_secs_f64(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token, or says how long until one is available.
    fn check(&self, key: &K) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= PRUNE_AT {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(key.clone()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

/// All limiters of one server.
pub struct Limits {
    pub settings: LimitSettings,
    /// The deployment-wide buckets, with several instances.
    shared: Option<shared::SharedBuckets>,
    messages: RateLimiter<UserId>,
    /// Keyed by account *and* address: someone guessing from one address exhausts their own
    /// bucket, never the owner's (who logs in from another), so failed guesses cannot lock
    /// the owner out. `login_by_address` bounds one address across all accounts.
    login_by_account: RateLimiter<String>,
    login_by_address: RateLimiter<IpAddr>,
    registrations_by_address: RateLimiter<IpAddr>,
    /// One bucket for the whole instance (one constant key), against many addresses.
    registrations_total: RateLimiter<&'static str>,
    refreshes_by_address: RateLimiter<IpAddr>,
    threads: RateLimiter<UserId>,
    tickets: RateLimiter<UserId>,
    imports: RateLimiter<UserId>,
    /// Open connections per user (WebSockets and event streams).
    connections: SlotCounter,
    /// Direct completions in progress per user.
    completions: SlotCounter,
}

const LOGIN_WINDOW: Duration = Duration::from_secs(300);
const MESSAGE_WINDOW: Duration = Duration::from_secs(60);
/// The window of every other per-minute limit; the burst is the per-minute count.
const MINUTE: Duration = Duration::from_secs(60);

/// A rate limit that refused: its metric name and what the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    Login,
    Registration,
    Refresh,
    ThreadCreation,
    Ticket,
    Import,
}

impl Throttled {
    /// The `reason` label of `apex_limit_rejections_total`.
    pub fn metric_reason(self) -> &'static str {
        match self {
            Throttled::Login => "login_throttled",
            Throttled::Registration => "registration_throttled",
            Throttled::Refresh => "refresh_throttled",
            Throttled::ThreadCreation => "thread_creation_throttled",
            Throttled::Ticket => "ticket_throttled",
            Throttled::Import => "import_throttled",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Throttled::Login => "too many login attempts; try again later",
            Throttled::Registration => "too many accounts created from here; try again later",
            Throttled::Refresh => "too many token refreshes; try again later",
            Throttled::ThreadCreation => "too many threads created; try again later",
            Throttled::Ticket => "too many WebSocket tickets requested; try again later",
            Throttled::Import => "too many imports; try again later",
        }
    }
}

/// A limiter of `count` per minute with a burst of `count` (0: never consulted).
fn per_minute<K: Eq + Hash + Clone>(count: u32) -> RateLimiter<K> {
    RateLimiter::new(count, MINUTE, count)
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Self::with_shared(settings, None)
    }

    /// Limits whose rate buckets live in `shared` (Redis) when given.
    pub fn with_shared(settings: LimitSettings, shared: Option<shared::SharedBuckets>) -> Self {
        Self {
            shared,
            messages: RateLimiter::new(
                settings.message_burst,
                MESSAGE_WINDOW,
                settings.messages_per_minute,
            ),
            login_by_account: RateLimiter::new(
                settings.login_attempts_per_account,
                LOGIN_WINDOW,
                settings.login_attempts_per_account,
            ),
            login_by_address: RateLimiter::new(
                settings.login_attempts_per_address,
                LOGIN_WINDOW,
                settings.login_attempts_per_address,
            ),
            registrations_by_address: per_minute(settings.registrations_per_minute),
            registrations_total: per_minute(settings.registrations_per_minute_total),
            refreshes_by_address: per_minute(settings.refreshes_per_minute),
            threads: per_minute(settings.threads_per_minute),
            tickets: per_minute(settings.tickets_per_minute),
            imports: per_minute(settings.imports_per_minute),
            connections: SlotCounter::default(),
            completions: SlotCounter::default(),
            settings,
        }
    }

    /// A run-starting message from `user`; `Err(retry_after)` when over the rate.
    pub async fn check_message(&self, user: UserId) -> Result<(), Duration> {
        let (burst, count) = (
            self.settings.message_burst,
            self.settings.messages_per_minute,
        );
        self.take(
            &self.messages,
            "messages",
            &user,
            burst,
            MESSAGE_WINDOW,
            count,
        )
        .await
    }

    /// A login attempt for `email` from `address`.
    pub async fn check_login(&self, email: &str, address: Option<IpAddr>) -> Result<(), Duration> {
        if let Some(address) = address {
            let count = self.settings.login_attempts_per_address;
            self.take(
                &self.login_by_address,
                "login-address",
                &address,
                count,
                LOGIN_WINDOW,
                count,
            )
            .await?;
        }
        let count = self.settings.login_attempts_per_account;
        let account = format!(
            "{}|{}",
            email.trim().to_ascii_lowercase(),
            address.map(|a| a.to_string()).unwrap_or_default()
        );
        self.take(
            &self.login_by_account,
            "login-account",
            &account,
            count,
            LOGIN_WINDOW,
            count,
        )
        .await
    }

    /// An account created from `address`: limited per address and for the instance as a
    /// whole (each count 0 = off).
    pub async fn check_registration(&self, address: Option<IpAddr>) -> Result<(), Duration> {
        if let Some(address) = address {
            let count = self.settings.registrations_per_minute;
            self.per_minute(
                &self.registrations_by_address,
                "register-address",
                &address,
                count,
            )
            .await?;
        }
        let count = self.settings.registrations_per_minute_total;
        self.per_minute(&self.registrations_total, "register-total", &"all", count)
            .await
    }

    /// A refresh-token exchange from `address`.
    pub async fn check_refresh(&self, address: Option<IpAddr>) -> Result<(), Duration> {
        let Some(address) = address else {
            return Ok(());
        };
        let count = self.settings.refreshes_per_minute;
        self.per_minute(
            &self.refreshes_by_address,
            "refresh-address",
            &address,
            count,
        )
        .await
    }

    /// A thread created by `user` with `POST /api/threads` (a message without a thread is
    /// under the message rate).
    pub async fn check_thread_creation(&self, user: UserId) -> Result<(), Duration> {
        let count = self.settings.threads_per_minute;
        self.per_minute(&self.threads, "threads", &user, count)
            .await
    }

    /// A WebSocket ticket for `user`.
    pub async fn check_ticket(&self, user: UserId) -> Result<(), Duration> {
        let count = self.settings.tickets_per_minute;
        self.per_minute(&self.tickets, "tickets", &user, count)
            .await
    }

    /// A usage import by `user`.
    pub async fn check_import(&self, user: UserId) -> Result<(), Duration> {
        let count = self.settings.imports_per_minute;
        self.per_minute(&self.imports, "imports", &user, count)
            .await
    }

    /// One token of a per-minute limit whose burst is its count; a count of 0 is no limit.
    async fn per_minute<K: Eq + Hash + Clone + std::fmt::Display>(
        &self,
        local: &RateLimiter<K>,
        name: &str,
        key: &K,
        count: u32,
    ) -> Result<(), Duration> {
        if count == 0 {
            return Ok(());
        }
        self.take(local, name, key, count, MINUTE, count).await
    }

    /// One token from the deployment-wide bucket, or from the local one when there is
    /// none (one instance) or Redis does not answer.
    async fn take<K: Eq + Hash + Clone + std::fmt::Display>(
        &self,
        local: &RateLimiter<K>,
        name: &str,
        key: &K,
        burst: u32,
        per: Duration,
        count: u32,
    ) -> Result<(), Duration> {
        if let Some(shared) = &self.shared {
            match shared.take(name, &key.to_string(), burst, per, count).await {
                shared::Verdict::Allowed => return Ok(()),
                shared::Verdict::Wait(wait) => return Err(wait),
                shared::Verdict::Unavailable => {}
            }
        }
        local.check(key)
    }

    /// Registers a connection of `user` (a WebSocket or an event stream); `None` when they
    /// already have the maximum.
    pub fn open_connection(&self, user: UserId) -> Option<ConnectionGuard> {
        self.connections
            .take(user, self.settings.max_connections_per_user)
    }

    /// Registers a direct completion of `user` for as long as the guard lives; `None` when
    /// they already have `max_completions_per_user` in progress.
    pub fn start_completion(&self, user: UserId) -> Option<SlotGuard> {
        self.completions
            .take(user, self.settings.max_completions_per_user)
    }

    /// Users with at least one open connection (for tests and metrics).
    pub fn users_with_connections(&self) -> usize {
        self.connections.users()
    }
}

/// How many slots of one kind each user holds; an entry exists only while the user holds
/// one, so the map never outgrows the users active right now.
#[derive(Default)]
struct SlotCounter(Arc<Mutex<HashMap<UserId, usize>>>);

impl SlotCounter {
    /// One more slot for `user`, unless they hold `max` already.
    fn take(&self, user: UserId, max: usize) -> Option<SlotGuard> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(user).or_insert(0);
        if *count >= max {
            if *count == 0 {
                counts.remove(&user);
            }
            return None;
        }
        *count += 1;
        Some(SlotGuard {
            user,
            counts: Arc::clone(&self.0),
        })
    }

    fn users(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Holds one slot of a user (a connection, a completion); dropping it frees the slot.
pub struct SlotGuard {
    user: UserId,
    counts: Arc<Mutex<HashMap<UserId, usize>>>,
}

/// One open connection's slot.
pub type ConnectionGuard = SlotGuard;

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_asks_to_wait() {
        let limiter = RateLimiter::new(3, Duration::from_secs(60), 60);
        let key = "k".to_string();
        for _ in 0..3 {
            assert!(limiter.check(&key).is_ok());
        }
        let wait = limiter.check(&key).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(
            limiter.check(&"other".to_string()).is_ok(),
            "keys are independent"
        );
    }

    #[test]
    fn connection_slots_are_capped_and_released() {
        let limits = Limits::new(LimitSettings {
            max_connections_per_user: 2,
            ..LimitSettings::default()
        });
        let user = UserId::generate();
        let a = limits.open_connection(user).unwrap();
        let _b = limits.open_connection(user).unwrap();
        assert!(limits.open_connection(user).is_none());
        drop(a);
        assert!(limits.open_connection(user).is_some());
        assert_eq!(limits.users_with_connections(), 1);
    }

    #[test]
    fn completion_slots_are_per_user_and_apart_from_connections() {
        let limits = Limits::new(LimitSettings {
            max_connections_per_user: 1,
            max_completions_per_user: 2,
            ..LimitSettings::default()
        });
        let (user, other) = (UserId::generate(), UserId::generate());
        let _connection = limits.open_connection(user).unwrap();
        let first = limits.start_completion(user).unwrap();
        let _second = limits.start_completion(user).unwrap();
        assert!(limits.start_completion(user).is_none(), "over the cap");
        assert!(limits.start_completion(other).is_some(), "users are apart");
        drop(first);
        assert!(
            limits.start_completion(user).is_some(),
            "a freed slot is reusable"
        );
    }
}
