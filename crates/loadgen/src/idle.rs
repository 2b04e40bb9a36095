//! Idle connections: many authenticated WebSockets that just stay open, to measure what an
//! idle connection costs the server (`apex loadgen --idle-connections N`).
//!
//! Phases are announced on stderr (`registered`, `connected`) so a benchmark script can read
//! the server's memory between them; the connections then stay open for the hold time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::user::Account;
use crate::LoadConfig;

/// What the idle phase achieved.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IdleReport {
    pub users: usize,
    pub requested: usize,
    pub opened: usize,
    pub failed: usize,
    pub connect_seconds: f64,
}

/// Registers `config.users` users, opens `connections` WebSockets spread evenly over them,
/// announces each phase on stderr, and keeps them open for `hold`.
pub async fn hold_idle(
    config: LoadConfig,
    connections: usize,
    hold: Duration,
) -> anyhow::Result<IdleReport> {
    for url in std::iter::once(&config.base_url).chain(&config.also_servers) {
        crate::check_loopback(url)?;
    }
    let config = Arc::new(config);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let users = config.users.max(1);
    let registration = Arc::new(tokio::sync::Semaphore::new(
        config.registration_concurrency.max(1),
    ));
    let mut registering = Vec::new();
    for index in 0..users {
        let (http, config, registration) =
            (http.clone(), Arc::clone(&config), Arc::clone(&registration));
        registering.push(tokio::spawn(async move {
            let _permit = registration.acquire_owned().await;
            Account::register(&http, &config, index).await
        }));
    }
    let mut accounts = Vec::new();
    for task in registering {
        accounts.push(task.await??);
    }
    eprintln!("registered {} users", accounts.len());

    let started = Instant::now();
    // Bounded concurrency: a burst of 10,000 handshakes would only measure the backlog.
    let opening = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..connections {
        let account = &accounts[i % accounts.len()];
        let url = account.ws_urls[i % account.ws_urls.len()].clone();
        let token = account.token.clone();
        let opening = Arc::clone(&opening);
        tasks.push(tokio::spawn(async move {
            let _permit = opening.acquire_owned().await;
            let mut request = url.as_str().into_client_request()?;
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse()?);
            let (socket, _) = tokio_tungstenite::connect_async(request).await?;
            anyhow::Ok(socket)
        }));
    }
    let mut sockets = Vec::new();
    let mut report = IdleReport {
        users: accounts.len(),
        requested: connections,
        ..IdleReport::default()
    };
    for task in tasks {
        match task.await {
            Ok(Ok(socket)) => sockets.push(socket),
            _ => report.failed += 1,
        }
    }
    report.opened = sockets.len();
    report.connect_seconds = started.elapsed().as_secs_f64();
    eprintln!("connected {} ({} failed)", report.opened, report.failed);
    // Read (and drop) whatever the server sends, so pings are answered and nothing backs up.
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            tokio::spawn(async move {
                let (_sink, mut stream) = socket.split();
                while let Some(Ok(_)) = stream.next().await {}
            })
        })
        .collect();
    tokio::time::sleep(hold).await;
    for reader in readers {
        reader.abort();
    }
    Ok(report)
}
