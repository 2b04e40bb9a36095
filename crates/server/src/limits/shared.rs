//! Rate limits that hold across instances: token buckets kept in Redis (the deployment's
//! bus), so a user who spreads messages or login attempts over several instances behind a
//! load balancer gets the same limit as on one.
//!
//! One bucket is a Redis hash updated by one Lua script, atomically, with Redis's own
//! clock (instances' clocks may differ). Buckets expire once they would be full again, so
//! Redis keeps nothing for idle users. When Redis does not answer, the instance falls back
//! to its own in-process bucket for that check (logged): a limit held per instance for a
//! moment is better than refusing every user while the bus is down.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use tokio::sync::Mutex;

/// Takes a token from `KEYS[1]` (burst `ARGV[1]`, `ARGV[2]` tokens per millisecond).
/// Returns `{1, 0}` when allowed, `{0, wait_ms}` otherwise.
const TAKE_TOKEN: &str = r#"
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local bucket = redis.call('HMGET', KEYS[1], 't', 'at')
local tokens = tonumber(bucket[1])
local at = tonumber(bucket[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 't', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
return {allowed, wait}
"#;

const TIMEOUT: Duration = Duration::from_millis(500);

/// A connection to the deployment's Redis for rate limits; shared infrastructure with no
/// user data (the buckets live in Redis).
pub struct SharedBuckets {
    client: redis::Client,
    /// Key prefix: the deployment's bus channel prefix, so deployments sharing a Redis do
    /// not share limits.
    prefix: String,
    /// Opened on first use and again after a failure.
    connection: Mutex<Option<MultiplexedConnection>>,
    script: redis::Script,
}

/// What Redis said about one token.
pub enum Verdict {
    Allowed,
    Wait(Duration),
    /// Redis could not be asked; the caller decides locally.
    Unavailable,
}

impl SharedBuckets {
    pub fn new(client: redis::Client, prefix: &str) -> Self {
        Self {
            client,
            prefix: prefix.to_string(),
            connection: Mutex::new(None),
            script: redis::Script::new(TAKE_TOKEN),
        }
    }

    /// Takes a token from the bucket `name:key` (`burst` tokens, refilled at `count` per
    /// `per`).
    pub async fn take(
        &self,
        name: &str,
        key: &str,
        burst: u32,
        per: Duration,
        count: u32,
    ) -> Verdict {
        let rate_per_ms = f64::from(count.max(1)) / per.as_millis().max(1) as f64;
        let bucket = format!("{}:limit:{name}:{key}", self.prefix);
        let Some(mut connection) = self.connection().await else {
            return Verdict::Unavailable;
        };
        let answer: redis::RedisResult<(i64, i64)> = self
            .script
            .key(bucket)
            .arg(burst.max(1))
            .arg(rate_per_ms)
            .invoke_async(&mut connection)
            .await;
        match answer {
            Ok((1, _)) => Verdict::Allowed,
            Ok((_, wait_ms)) => Verdict::Wait(Duration::from_millis(wait_ms.max(1) as u64)),
            Err(err) => {
                tracing::warn!(error = %err, "rate limits: Redis failed; limiting per instance");
                *self.connection.lock().await = None;
                Verdict::Unavailable
            }
        }
    }

    /// The shared connection (a multiplexed one: clones send concurrently over it),
    /// opened on first use and after a failure.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT));
            match self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(connection) => *slot = Some(connection),
                Err(err) => {
                    tracing::warn!(error = %err, "rate limits: Redis unreachable; limiting per instance");
                    return None;
                }
            }
        }
        slot.clone()
    }
}
