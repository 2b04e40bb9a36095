//! `RedisBus`: the event bus between several Apex instances, over Redis pub/sub.
//!
//! It owns the two Redis connections of an instance (one publishing, one subscribed) and
//! the hop between instances; nothing else. Why it looks the way it does:
//!
//! - **Persist first, publish second** is unchanged: the emitter has stored every event
//!   before it reaches [`EventBus::publish`], so Redis only carries notifications of
//!   durable events and may lose some without losing data.
//! - **Local fan-out stays local.** An event is handed to this instance's
//!   [`InProcessBus`] at once and also sent to Redis, tagged with this instance's id;
//!   each instance ignores its own messages when they come back and hands the others' to
//!   its `InProcessBus`, which routes by user id exactly as with a single instance. A
//!   connection therefore only ever receives its own user's events, whichever instance
//!   produced them.
//! - **One channel per prefix** (`<prefix>:events`) rather than one per user: the
//!   subscription is established once at start, so there is no window in which a new
//!   connection's user is not yet subscribed. Control messages (cross-instance stop,
//!   resync) use `<prefix>:control`.
//! - **A lost hop looks like a lag.** When the subscription drops, it is re-established
//!   with backoff and then every local subscription is told to resync, so connections
//!   replay from the store exactly as when they fall behind the local buffer. When this
//!   instance could not publish something (Redis down, queue full), it broadcasts a
//!   `resync` as soon as it can publish again, so the other instances catch up too.
//! - The URL may carry a password: it is held as a [`Secret`] and never logged.
//! - **Every frame is authenticated.** Anyone who can publish on the Redis channel could
//!   otherwise hand a user's sockets events of their choosing (or stop other users' runs).
//!   Each message is `v1.<hex HMAC-SHA256>\n<body>`, the MAC taken over the channel name
//!   and the body with a key derived from the deployment's shared JWT secret
//!   ([`BusKey::derive`]), so only instances of the same deployment can produce one, and a
//!   control message cannot be replayed as an event. A message whose MAC is missing or
//!   wrong is dropped and counted (`apex_bus_frames_rejected_total`); the first is logged
//!   at warn, without its payload. A genuine frame recorded and published again is
//!   accepted (no replay window): it only repeats an event the store already holds, which
//!   clients drop by its sequence number, or a stop or resync that was already asked for.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::bus::{BusEvent, BusHealth, EventBus, InProcessBus, UserSubscription};
use crate::ids::{RunId, UserId};
use crate::settings::Secret;
use crate::telemetry;

type HmacSha256 = Hmac<Sha256>;

/// The key that authenticates bus frames: HMAC-SHA256 of the label `apex-bus-v1` under the
/// deployment's JWT secret, so the secret itself signs nothing but tokens, and every
/// instance sharing that secret derives the same key. Never printed.
#[derive(Clone)]
pub struct BusKey([u8; 32]);

impl BusKey {
    pub fn derive(secret: &Secret) -> Self {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(b"apex-bus-v1");
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, channel: &str, body: &str) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        // The channel is part of what is signed: a control frame is no valid event frame.
        mac.update(channel.as_bytes());
        mac.update(b"\n");
        mac.update(body.as_bytes());
        mac
    }

    /// `body` with its MAC, as published on `channel`.
    fn seal(&self, channel: &str, body: &str) -> String {
        let tag = self.mac(channel, body).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("{MAC_PREFIX}{hex}\n{body}")
    }

    /// The body of a message received on `channel`, if its MAC is there and right
    /// (compared in constant time).
    fn open<'a>(&self, channel: &str, message: &'a str) -> Option<&'a str> {
        let (tag, body) = message.strip_prefix(MAC_PREFIX)?.split_once('\n')?;
        if tag.len() != 64 || !tag.is_ascii() {
            return None;
        }
        let bytes = (0..32)
            .map(|i| u8::from_str_radix(&tag[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        self.mac(channel, body).verify_slice(&bytes).ok()?;
        Some(body)
    }
}

impl std::fmt::Debug for BusKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The start of every message: the format's version, then the MAC in hex.
const MAC_PREFIX: &str = "v1.";

/// What the bus does with a stop request from another instance: cancel the run if it
/// executes here and belongs to that owner.
pub type StopHandler = Arc<dyn Fn(UserId, RunId) + Send + Sync>;

/// Messages waiting to be published; past this, messages are dropped and the other
/// instances are told to resync once publishing works again.
const QUEUE: usize = 65_536;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often an idle connection is checked with PING.
const PING_EVERY: Duration = Duration::from_secs(1);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where and as whom this instance talks to Redis.
#[derive(Debug, Clone)]
pub struct RedisBusConfig {
    /// `redis://[user:password@]host:port[/db]`; never logged.
    pub url: Secret,
    /// Prefix of the channel names, so several deployments (or tests) can share a Redis.
    pub prefix: String,
    /// This instance's id, to recognise its own messages.
    pub instance_id: String,
    /// Authenticates the messages (see [`BusKey`]).
    pub key: BusKey,
}

enum Outgoing {
    Event(Arc<BusEvent>),
    Stop { owner: UserId, run: RunId },
}

#[derive(Default)]
struct Flags {
    subscribed: AtomicBool,
    publishing: AtomicBool,
    /// Something could not be published: the other instances must resync.
    lost: AtomicBool,
}

pub struct RedisBus {
    local: Arc<InProcessBus>,
    instance_id: String,
    outgoing: mpsc::Sender<Outgoing>,
    flags: Arc<Flags>,
    /// Ends the background tasks when the bus is dropped.
    tasks: CancellationToken,
}

struct Channels {
    events: String,
    control: String,
    key: BusKey,
    /// A frame with a bad MAC was already logged (once is enough to alert; the metric
    /// counts them all).
    warned: AtomicBool,
}

impl RedisBus {
    /// Starts the publishing and subscribing tasks. Fails only on a malformed URL: an
    /// unreachable Redis is retried with backoff (and reported by [`EventBus::health`]).
    pub fn start(config: RedisBusConfig, on_stop: StopHandler) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.url.expose())
            .map_err(|_| anyhow::anyhow!("the bus URL is not a valid redis:// URL"))?;
        let channels = Arc::new(Channels {
            events: format!("{}:events", config.prefix),
            control: format!("{}:control", config.prefix),
            key: config.key,
            warned: AtomicBool::new(false),
        });
        let local = Arc::new(InProcessBus::new());
        let flags = Arc::new(Flags::default());
        let tasks = CancellationToken::new();
        let (outgoing, queue) = mpsc::channel(QUEUE);
        tokio::spawn(publish_loop(
            client.clone(),
            queue,
            Arc::clone(&flags),
            Arc::clone(&channels),
            config.instance_id.clone(),
            tasks.clone(),
        ));
        tokio::spawn(subscribe_loop(
            client,
            Arc::clone(&local),
            Arc::clone(&flags),
            channels,
            config.instance_id.clone(),
            on_stop,
            tasks.clone(),
        ));
        Ok(Self {
            local,
            instance_id: config.instance_id,
            outgoing,
            flags,
            tasks,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    fn enqueue(&self, message: Outgoing) -> bool {
        if self.outgoing.try_send(message).is_err() {
            self.flags.lost.store(true, Ordering::SeqCst);
            return false;
        }
        true
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.tasks.cancel();
    }
}

impl EventBus for RedisBus {
    fn publish(&self, event: Arc<BusEvent>) {
        self.local.publish(Arc::clone(&event));
        self.enqueue(Outgoing::Event(event));
    }

    fn subscribe(&self, user: UserId) -> UserSubscription {
        self.local.subscribe(user)
    }

    fn subscribed_users(&self) -> usize {
        self.local.subscribed_users()
    }

    fn health(&self) -> BusHealth {
        BusHealth {
            kind: "redis",
            connected: self.flags.subscribed.load(Ordering::SeqCst)
                && self.flags.publishing.load(Ordering::SeqCst),
        }
    }

    fn request_stop(&self, owner: UserId, run: RunId) -> bool {
        self.flags.publishing.load(Ordering::SeqCst) && self.enqueue(Outgoing::Stop { owner, run })
    }
}

/// Exponential backoff with a little jitter, so instances do not reconnect in lockstep.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_FIRST)
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_FIRST;
    }
    fn next(&mut self) -> Duration {
        let current = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        let jitter = rand::random::<u64>() % (current.as_millis() as u64 / 4 + 1);
        current + Duration::from_millis(jitter)
    }
}

/// Sleeps `delay`; `false` if the bus was dropped meanwhile.
async fn pause(delay: Duration, tasks: &CancellationToken) -> bool {
    tokio::select! {
        _ = tasks.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

fn event_payload(origin: &str, event: &BusEvent) -> String {
    format!(
        "{origin}\n{}\n{}\n{}\n{}\n{}",
        event.user_id,
        event.run_id,
        event.seq,
        u8::from(event.terminal),
        event.json
    )
}

fn parse_event(payload: &str) -> Option<(&str, BusEvent)> {
    let mut parts = payload.splitn(6, '\n');
    let origin = parts.next()?;
    let user_id = UserId::parse(parts.next()?).ok()?;
    let run_id = RunId::parse(parts.next()?).ok()?;
    let seq = parts.next()?.parse::<u64>().ok()?;
    let terminal = match parts.next()? {
        "1" => true,
        "0" => false,
        _ => return None,
    };
    let json = parts.next()?.to_string();
    Some((
        origin,
        BusEvent {
            user_id,
            run_id,
            seq,
            terminal,
            json,
            emitted_at: std::time::Instant::now(),
            relayed: true,
        },
    ))
}

/// A control message: `stop` of one run, or `resync` (the sender lost messages).
#[derive(Debug, PartialEq, Eq)]
enum Control<'a> {
    Stop {
        origin: &'a str,
        owner: UserId,
        run: RunId,
    },
    Resync {
        origin: &'a str,
    },
}

fn parse_control(payload: &str) -> Option<Control<'_>> {
    let mut parts = payload.split('\n');
    match parts.next()? {
        "stop" => Some(Control::Stop {
            origin: parts.next()?,
            owner: UserId::parse(parts.next()?).ok()?,
            run: RunId::parse(parts.next()?).ok()?,
        }),
        "resync" => Some(Control::Resync {
            origin: parts.next()?,
        }),
        _ => None,
    }
}

async fn connect(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Publishes `payload`, sealed with the deployment's key, on `channel`.
async fn publish(
    conn: &mut MultiplexedConnection,
    channels: &Channels,
    channel: &str,
    payload: String,
) -> redis::RedisResult<()> {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(channels.key.seal(channel, &payload))
        .query_async::<i64>(conn)
        .await
        .map(|_| ())
}

async fn publish_loop(
    client: redis::Client,
    mut queue: mpsc::Receiver<Outgoing>,
    flags: Arc<Flags>,
    channels: Arc<Channels>,
    instance_id: String,
    tasks: CancellationToken,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    let mut backoff = Backoff::new();
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        if conn.is_none() {
            match connect(&client).await {
                Ok(mut fresh) => {
                    // Tell the others about anything we could not send before.
                    if flags.lost.swap(false, Ordering::SeqCst) {
                        let resync = format!("resync\n{instance_id}");
                        if publish(&mut fresh, &channels, &channels.control, resync)
                            .await
                            .is_err()
                        {
                            flags.lost.store(true, Ordering::SeqCst);
                            if !pause(backoff.next(), &tasks).await {
                                return;
                            }
                            continue;
                        }
                    }
                    if !flags.publishing.swap(true, Ordering::SeqCst) {
                        tracing::info!("event bus: publishing to Redis");
                    }
                    backoff.reset();
                    conn = Some(fresh);
                }
                Err(err) => {
                    if flags.publishing.swap(false, Ordering::SeqCst) {
                        tracing::warn!(error = %err, "event bus: cannot publish to Redis; retrying");
                    }
                    // Whatever waits now cannot be sent in order; the others will resync.
                    while queue.try_recv().is_ok() {
                        flags.lost.store(true, Ordering::SeqCst);
                    }
                    if !pause(backoff.next(), &tasks).await {
                        return;
                    }
                }
            }
            continue;
        }
        let Some(active) = conn.as_mut() else {
            continue;
        };
        let sent = tokio::select! {
            _ = tasks.cancelled() => return,
            message = queue.recv() => match message {
                None => return,
                Some(Outgoing::Event(event)) => {
                    publish(active, &channels, &channels.events, event_payload(&instance_id, &event)).await
                }
                Some(Outgoing::Stop { owner, run }) => {
                    let payload = format!("stop\n{instance_id}\n{owner}\n{run}");
                    publish(active, &channels, &channels.control, payload).await
                }
            },
            _ = ping.tick() => redis::cmd("PING").query_async::<String>(active).await.map(|_| ()),
        };
        if let Err(err) = sent {
            tracing::warn!(error = %err, "event bus: publishing to Redis failed; reconnecting");
            flags.lost.store(true, Ordering::SeqCst);
            flags.publishing.store(false, Ordering::SeqCst);
            conn = None;
        }
    }
}

async fn subscribe_loop(
    client: redis::Client,
    local: Arc<InProcessBus>,
    flags: Arc<Flags>,
    channels: Arc<Channels>,
    instance_id: String,
    on_stop: StopHandler,
    tasks: CancellationToken,
) {
    let mut backoff = Backoff::new();
    let mut reported_down = false;
    loop {
        let subscribed = async {
            let pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connecting timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let (mut sink, stream) = pubsub.split();
            let names = [channels.events.as_str(), channels.control.as_str()];
            tokio::time::timeout(RESPONSE_TIMEOUT, sink.subscribe(&names))
                .await
                .map_err(|_| "subscribing timed out".to_string())?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((sink, stream))
        }
        .await;
        match subscribed {
            Ok((mut sink, mut stream)) => {
                flags.subscribed.store(true, Ordering::SeqCst);
                tracing::info!("event bus: subscribed to Redis");
                reported_down = false;
                backoff.reset();
                // Anything published while we were not subscribed is in the store.
                local.resync_all();
                let mut ping = tokio::time::interval(PING_EVERY);
                loop {
                    tokio::select! {
                        _ = tasks.cancelled() => return,
                        message = stream.next() => match message {
                            Some(message) => handle_message(&message, &channels, &instance_id, &local, &on_stop),
                            None => break,
                        },
                        _ = ping.tick() => {
                            let answered = tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>()).await;
                            if !matches!(answered, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                flags.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!("event bus: lost the Redis subscription; reconnecting");
            }
            Err(err) => {
                flags.subscribed.store(false, Ordering::SeqCst);
                if !reported_down {
                    tracing::warn!(error = %err, "event bus: cannot subscribe to Redis; retrying");
                    reported_down = true;
                }
            }
        }
        if !pause(backoff.next(), &tasks).await {
            return;
        }
    }
}

fn handle_message(
    message: &redis::Msg,
    channels: &Channels,
    instance_id: &str,
    local: &InProcessBus,
    on_stop: &StopHandler,
) {
    let channel = message.get_channel_name();
    let opened = std::str::from_utf8(message.get_payload_bytes())
        .ok()
        .and_then(|text| channels.key.open(channel, text));
    let Some(payload) = opened else {
        telemetry::bus_frame_rejected();
        // Never the payload: it is whatever an intruder chose to send.
        if !channels.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                channel,
                "event bus: dropped a Redis message without a valid MAC (someone else can \
                 publish on this Redis, or an instance has another JWT secret); further ones \
                 are only counted in apex_bus_frames_rejected_total"
            );
        }
        return;
    };
    if channel == channels.events {
        match parse_event(payload) {
            // Our own events were delivered locally when they were published.
            Some((origin, _)) if origin == instance_id => {}
            Some((_, event)) => local.publish(Arc::new(event)),
            None => tracing::warn!("event bus: ignored a malformed event message"),
        }
    } else if channel == channels.control {
        match parse_control(payload) {
            Some(Control::Stop { origin, owner, run }) if origin != instance_id => {
                on_stop(owner, run)
            }
            Some(Control::Resync { origin }) if origin != instance_id => local.resync_all(),
            Some(_) => {}
            None => tracing::warn!("event bus: ignored a malformed control message"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_messages_round_trip_and_bad_ones_are_refused() {
        let event = BusEvent {
            user_id: UserId::generate(),
            run_id: RunId::generate(),
            seq: 42,
            terminal: true,
            json: "{\"a\":\"line\\nbreak\"}\n".into(),
            emitted_at: std::time::Instant::now(),
            relayed: false,
        };
        let payload = event_payload("instance-1", &event);
        let (origin, parsed) = parse_event(&payload).unwrap();
        assert_eq!(origin, "instance-1");
        assert_eq!(parsed.user_id, event.user_id);
        assert_eq!(parsed.run_id, event.run_id);
        assert_eq!(parsed.seq, 42);
        assert!(parsed.relayed, "what comes over Redis is marked relayed");
        assert!(parsed.terminal);
        assert_eq!(parsed.json, event.json);

        assert!(parse_event("").is_none());
        assert!(parse_event("o\nnot-a-user\nx\n1\n0\n{}").is_none());
        let bad_seq = payload.replacen("\n42\n", "\n-1\n", 1);
        assert!(parse_event(&bad_seq).is_none());
    }

    #[test]
    fn only_messages_sealed_with_the_key_for_their_channel_open() {
        let key = BusKey::derive(&Secret::new("a".repeat(40)));
        let sealed = key.seal("apex:events", "body\nwith lines");
        assert_eq!(key.open("apex:events", &sealed), Some("body\nwith lines"));
        // Another channel, another deployment's key, a changed body, no MAC at all.
        assert_eq!(key.open("apex:control", &sealed), None);
        let other = BusKey::derive(&Secret::new("b".repeat(40)));
        assert_eq!(other.open("apex:events", &sealed), None);
        let tampered = sealed.replace("body", "bodY");
        assert_eq!(key.open("apex:events", &tampered), None);
        assert_eq!(key.open("apex:events", "body\nwith lines"), None);
        assert_eq!(key.open("apex:events", "v1.zz\nbody"), None);
        let non_ascii = format!("v1.{}\nbody", "é".repeat(32));
        assert_eq!(key.open("apex:events", &non_ascii), None);
        assert_eq!(format!("{key:?}"), "[redacted]");
    }

    #[test]
    fn control_messages_parse() {
        let (owner, run) = (UserId::generate(), RunId::generate());
        assert_eq!(
            parse_control(&format!("stop\ni1\n{owner}\n{run}")),
            Some(Control::Stop {
                origin: "i1",
                owner,
                run
            })
        );
        assert_eq!(
            parse_control("resync\ni2"),
            Some(Control::Resync { origin: "i2" })
        );
        assert_eq!(parse_control("stop\ni1\nnope\nnope"), None);
        assert_eq!(parse_control("launch"), None);
    }
}
