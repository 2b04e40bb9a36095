//! Session lifetime and abuse throttles, written as the attacks of the security review
//! (issue 22): each test does what the attacker did and asserts it no longer works.
//!
//! - A socket outlived its token and the logout; a multi-use ticket kept opening sockets.
//! - A replayed refresh token revoked nothing; logout ended one pair, not the family; there
//!   was no absolute session lifetime and no way to end other sessions.
//! - Registration, tickets, refresh, thread creation and imports were unthrottled; ten
//!   wrong passwords locked the owner out; a signed token for a missing user got 200/500.

use std::time::{Duration, Instant};

use apex_protocol::auth::{SessionInfo, TokenPair};
use apex_server::settings::LimitSettings;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{
    spawn_app, spawn_app_with, TestApp, TestUser, WsClient, JWT_SECRET, PASSWORD,
};

/// The review's bound: a logged-out session's sockets receive nothing after one second.
/// Asserted with slack for a loaded test machine; the design target is 400 ms polling.
const SESSION_END_BOUND: Duration = Duration::from_secs(3);

async fn login(app: &TestApp, user: &TestUser) -> TokenPair {
    let response = app.login(&user.email, PASSWORD).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn refresh(app: &TestApp, refresh_token: &str) -> reqwest::Response {
    app.post_json(
        "/auth/refresh",
        None,
        &json!({ "refresh_token": refresh_token }),
    )
    .await
}

async fn ws_with_token(app: &TestApp, user: &TestUser, token: &str) -> WsClient {
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let mut client = WsClient::connect(request).await.expect("ws connect");
    let hello = client.next_json().await;
    assert_eq!(hello["type"], "connection_established", "{hello}");
    assert_eq!(hello["data"]["user_id"], user.id.as_str());
    client
}

async fn ws_with_ticket(app: &TestApp, ticket: &str) -> WsClient {
    let request = format!("{}?ticket={ticket}", app.ws_address)
        .into_client_request()
        .unwrap();
    WsClient::connect(request).await.expect("ws connect")
}

/// Reads until the socket closes; returns the error code sent before the close (if any) and
/// the close code and reason.
async fn until_closed(client: &mut WsClient) -> (Option<String>, (u16, String)) {
    let mut code = None;
    loop {
        match client.next_message().await {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "error_message" {
                    code = frame["error_code"].as_str().map(str::to_string);
                }
            }
            tokio_tungstenite::tungstenite::Message::Close(frame) => {
                let (close, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return (code, (close, reason));
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_socket_of_a_logged_out_session_is_closed_within_a_second() {
    let app = spawn_app().await;
    let victim = app.register().await;
    // The attacker holds a copy of the victim's access token and opens a socket with it.
    let mut stolen = ws_with_token(&app, &victim, victim.token()).await;
    let response = app
        .post_json("/auth/logout", Some(victim.token()), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    let logged_out = Instant::now();
    let (code, close) = tokio::time::timeout(SESSION_END_BOUND, until_closed(&mut stolen))
        .await
        .expect("the socket of the logged-out session must close");
    assert_eq!(close.0, 1008);
    assert!(
        close.1.starts_with("session_ended") && close.1.contains("ticket"),
        "the reason names the code, and a ticket for the original web client: {}",
        close.1
    );
    assert_eq!(code.as_deref(), Some("SESSION_ENDED"));
    assert!(logged_out.elapsed() < SESSION_END_BOUND);

    // The victim logs in again and asks: nothing of it reaches a socket of the old session
    // (a new one cannot be opened with the old token either).
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", victim.token()).parse().unwrap(),
    );
    let mut refused = WsClient::connect(request).await.unwrap();
    let frame = refused.next_json().await;
    assert_eq!(frame["error_code"], "AUTH_FAILED", "{frame}");
    assert_eq!(
        app.get("/api/threads", victim.token()).await.status(),
        401,
        "the old access token is dead on REST too"
    );
}

#[tokio::test]
async fn a_logout_elsewhere_closes_this_instances_socket_through_the_store() {
    // The socket's instance did not see the logout: only the store knows. Ending the
    // session directly in the store stands in for a logout on another instance (the
    // multi-instance test does it with real instances).
    let app = spawn_app().await;
    let victim = app.register().await;
    let mut socket = app.ws_connect(&victim).await;
    let sessions: Vec<SessionInfo> = app
        .get("/auth/sessions", victim.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sessions.len(), 1);
    let owner = apex_server::ids::UserId::parse(&victim.id).unwrap();
    let ended = app
        .state
        .infra
        .store
        .end_all_sessions(
            owner,
            apex_server::store::SessionEndReason::LogoutAll,
            chrono::Utc::now().timestamp_millis(),
        )
        .await
        .unwrap();
    assert_eq!(ended, vec![sessions[0].id.clone()]);
    let (code, close) = tokio::time::timeout(SESSION_END_BOUND, until_closed(&mut socket))
        .await
        .expect("the poll must find the ended session");
    assert_eq!((code.as_deref(), close.0), (Some("SESSION_ENDED"), 1008));
}

#[tokio::test]
async fn a_socket_closes_when_its_access_token_expires() {
    let app = spawn_app_with(|settings| {
        settings.access_token_ttl = Duration::from_secs(2);
    })
    .await;
    // The token's two seconds start at registration (its `exp` counts whole seconds, so it
    // lives at least one); measured from then, not from the socket's opening, which a
    // loaded machine may reach a second later.
    let issued = Instant::now();
    let user = app.register().await;
    let mut socket = app.ws_connect(&user).await;
    let (code, close) = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut socket))
        .await
        .expect("the socket must close when its token expires");
    assert_eq!((code.as_deref(), close.0), (Some("TOKEN_EXPIRED"), 1008));
    assert!(
        issued.elapsed() >= Duration::from_millis(900),
        "not before the token expired"
    );

    // A ticket bought with a token lives no longer than the token, and so does its socket.
    let fresh = login(&app, &user).await;
    let ticket: Value = app
        .post_json(
            "/api/websocket/ticket",
            Some(&fresh.access_token),
            &json!({"ttl_seconds": 600, "single_use": false}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(ticket["ttl_seconds"].as_u64().unwrap() <= 2, "{ticket}");
    let mut socket = ws_with_ticket(&app, ticket["ticket_id"].as_str().unwrap()).await;
    let (code, close) = tokio::time::timeout(Duration::from_secs(10), until_closed(&mut socket))
        .await
        .expect("a ticket's socket ends with the token that bought the ticket");
    assert_eq!((code.as_deref(), close.0), (Some("TOKEN_EXPIRED"), 1008));
}

#[tokio::test]
async fn tickets_die_with_their_session_and_multi_use_tickets_are_capped() {
    let app = spawn_app_with(|settings| {
        settings.limits.max_connections_per_user = 20;
    })
    .await;
    let victim = app.register().await;
    let ticket = app
        .ticket(&victim, json!({"ttl_seconds": 600, "single_use": false}))
        .await;
    let ticket_id = ticket["ticket_id"].as_str().unwrap();
    let mut opened = Vec::new();
    for _ in 0..apex_server::auth::MAX_TICKET_USES {
        let mut socket = ws_with_ticket(&app, ticket_id).await;
        let hello = socket.next_json().await;
        assert_eq!(hello["type"], "connection_established", "{hello}");
        opened.push(socket);
    }
    let mut one_more = ws_with_ticket(&app, ticket_id).await;
    let frame = one_more.next_json().await;
    assert_eq!(
        frame["error_code"], "AUTH_FAILED",
        "a multi-use ticket opens at most MAX_TICKET_USES sockets: {frame}"
    );

    // A second multi-use ticket, then logout: the ticket opens nothing more, and the
    // sockets opened with the first one close.
    let second = app
        .ticket(&victim, json!({"ttl_seconds": 600, "single_use": false}))
        .await;
    let response = app
        .post_json("/auth/logout", Some(victim.token()), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    let mut after_logout = ws_with_ticket(&app, second["ticket_id"].as_str().unwrap()).await;
    let frame = after_logout.next_json().await;
    assert_eq!(frame["error_code"], "AUTH_FAILED", "{frame}");
    for mut socket in opened {
        let (code, close) = tokio::time::timeout(SESSION_END_BOUND, until_closed(&mut socket))
            .await
            .expect("ticket sockets close with their session");
        assert_eq!((code.as_deref(), close.0), (Some("SESSION_ENDED"), 1008));
    }
    // The victim's own page can connect again: the attacker's sockets are gone.
    let fresh = login(&app, &victim).await;
    let mine = TestUser {
        tokens: fresh,
        ..victim.clone()
    };
    app.ws_connect(&mine).await;
}

#[tokio::test]
async fn a_replayed_refresh_token_ends_the_whole_session() {
    let app = spawn_app().await;
    let user = app.register().await;
    // The thief copied the first refresh token; the client rotates it legitimately.
    let stolen_refresh = user.tokens.refresh_token.clone();
    let response = refresh(&app, &user.tokens.refresh_token).await;
    assert_eq!(response.status(), 200);
    let rotated: TokenPair = response.json().await.unwrap();
    assert_eq!(
        app.get("/auth/me", &rotated.access_token).await.status(),
        200
    );

    // The thief replays the spent token: refused, and the family is ended.
    assert_eq!(refresh(&app, &stolen_refresh).await.status(), 401);
    assert_eq!(
        app.get("/auth/me", &rotated.access_token).await.status(),
        401,
        "the access token of the rotated pair dies with its session"
    );
    assert_eq!(
        refresh(&app, &rotated.refresh_token).await.status(),
        401,
        "and so does its refresh token"
    );
    // Other sessions of the user are not touched.
    let other = login(&app, &user).await;
    assert_eq!(app.get("/auth/me", &other.access_token).await.status(), 200);
}

#[tokio::test]
async fn logout_ends_the_refresh_token_of_the_session() {
    let app = spawn_app().await;
    let user = app.register().await;
    let response = app
        .post_json("/auth/logout", Some(user.token()), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        refresh(&app, &user.tokens.refresh_token).await.status(),
        401
    );
}

#[tokio::test]
async fn sessions_can_be_listed_and_ended_one_by_one_or_all_at_once() {
    let app = spawn_app().await;
    let user = app.register().await;
    let laptop = login(&app, &user).await;
    let phone = login(&app, &user).await;
    let sessions: Vec<SessionInfo> = app
        .get("/auth/sessions", &laptop.access_token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sessions.len(), 3, "{sessions:?}");
    assert_eq!(sessions.iter().filter(|s| s.current).count(), 1);
    let phone_session = app
        .get("/auth/sessions", &phone.access_token)
        .await
        .json::<Vec<SessionInfo>>()
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.current)
        .unwrap();

    // A stranger cannot end it: their answer is the one for a missing session.
    let stranger = app.register().await;
    let response = app
        .http
        .delete(app.url(&format!("/auth/sessions/{}", phone_session.id)))
        .bearer_auth(stranger.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let missing = app
        .http
        .delete(app.url("/auth/sessions/no-such-session"))
        .bearer_auth(stranger.token())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let (a, b): (Value, Value) = (
        response.json().await.unwrap(),
        missing.json().await.unwrap(),
    );
    assert_eq!(
        a, b,
        "a stranger's session answers exactly like a missing one"
    );
    assert_eq!(app.get("/auth/me", &phone.access_token).await.status(), 200);

    // The owner ends the phone's session from the laptop.
    let response = app
        .http
        .delete(app.url(&format!("/auth/sessions/{}", phone_session.id)))
        .bearer_auth(&laptop.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(app.get("/auth/me", &phone.access_token).await.status(), 401);
    assert_eq!(refresh(&app, &phone.refresh_token).await.status(), 401);
    assert_eq!(
        app.get("/auth/me", &laptop.access_token).await.status(),
        200
    );

    // Log out everywhere: every session ends, the asking one too.
    let response = app
        .post_json("/auth/logout-all", Some(&laptop.access_token), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    for token in [user.token(), laptop.access_token.as_str()] {
        assert_eq!(app.get("/auth/me", token).await.status(), 401);
    }
    assert_eq!(app.get("/auth/me", stranger.token()).await.status(), 200);
}

#[tokio::test]
async fn a_session_has_an_absolute_lifetime_that_rotation_does_not_extend() {
    let app = spawn_app_with(|settings| {
        settings.session_lifetime = Duration::from_secs(3);
    })
    .await;
    let user = app.register().await;
    assert!(
        user.tokens.expires_in <= 3,
        "no token outlives its session: {}",
        user.tokens.expires_in
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let response = refresh(&app, &user.tokens.refresh_token).await;
    assert_eq!(response.status(), 200);
    let rotated: TokenPair = response.json().await.unwrap();
    assert!(rotated.expires_in <= 2, "{}", rotated.expires_in);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        refresh(&app, &rotated.refresh_token).await.status(),
        401,
        "the session is over whatever was refreshed"
    );
}

#[tokio::test]
async fn a_validly_signed_token_for_a_user_that_does_not_exist_is_refused_with_401() {
    let app = spawn_app().await;
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "sub": uuid::Uuid::new_v4().to_string(), "iat": now, "exp": now + 600,
        "jti": uuid::Uuid::new_v4().to_string(), "type": "access", "iss": "apex",
        "aud": "apex-api", "sid": "made-up-session",
    });
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(app.get("/api/threads", &token).await.status(), 401);
    let response = app
        .post_json("/api/threads", Some(&token), &json!({"title": "x"}))
        .await;
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_token");
}

#[tokio::test]
async fn registration_is_throttled_per_address() {
    let app = spawn_app_with(|settings| {
        settings.limits = LimitSettings::default();
    })
    .await;
    let mut created = 0;
    let mut throttled = 0;
    let started = std::time::Instant::now();
    for i in 0..25 {
        let response = app
            .register_raw(
                &format!("bulk-{i}-{}@example.com", uuid::Uuid::new_v4().simple()),
                PASSWORD,
            )
            .await;
        match response.status().as_u16() {
            201 => created += 1,
            429 => {
                assert!(response.headers().contains_key("retry-after"));
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["error"]["code"], "rate_limited");
                throttled += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let allowed = LimitSettings::default().registrations_per_minute;
    // The bucket refills `allowed` a minute: on a loaded machine the 25 attempts take
    // seconds, and what refilled meanwhile may be spent too.
    let refilled = (started.elapsed().as_secs_f64() * f64::from(allowed) / 60.0).ceil() as u32;
    assert!(
        (allowed..=allowed + refilled).contains(&created),
        "at most the per-address burst (+{refilled} refilled) is created: {created}"
    );
    assert_eq!(created + throttled, 25);
    assert!(throttled >= 25 - allowed - refilled);
}

#[tokio::test]
async fn failed_logins_from_another_address_do_not_lock_the_owner_out() {
    let app = spawn_app_with(|settings| {
        settings.limits = LimitSettings {
            registrations_per_minute: 0,
            ..LimitSettings::default()
        };
    })
    .await;
    let owner = app.register().await;
    // The attacker guesses from 127.0.0.2 until throttled.
    let attacker = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..(LimitSettings::default().login_attempts_per_account + 3) {
        let response = attacker
            .post(app.url("/auth/login"))
            .json(&json!({"email": owner.email, "password": "wrong password!"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses.contains(&401) && statuses.ends_with(&[429]),
        "{statuses:?}"
    );
    // The owner, from their own address, still gets in.
    let response = app.login(&owner.email, PASSWORD).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn tickets_refreshes_thread_creation_and_imports_are_throttled() {
    let app = spawn_app_with(|settings| {
        settings.limits.tickets_per_minute = 3;
        settings.limits.refreshes_per_minute = 3;
        settings.limits.threads_per_minute = 3;
        settings.limits.imports_per_minute = 2;
    })
    .await;
    let user = app.register().await;
    let mut tickets = Vec::new();
    for _ in 0..4 {
        tickets.push(
            app.post_json("/api/websocket/ticket", Some(user.token()), &json!({}))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(tickets, [200, 200, 200, 429]);

    let mut threads = Vec::new();
    for _ in 0..4 {
        threads.push(
            app.post_json("/api/threads", Some(user.token()), &json!({"title": "t"}))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(threads, [201, 201, 201, 429]);

    let mut imports = Vec::new();
    for _ in 0..3 {
        let response = app
            .http
            .post(app.url("/api/usage/events"))
            .bearer_auth(user.token())
            .json(&json!([]))
            .send()
            .await
            .unwrap();
        imports.push(response.status().as_u16());
    }
    assert_eq!(imports[2], 429, "{imports:?}");
    assert_ne!(imports[0], 429, "{imports:?}");

    let mut refresh_token = user.tokens.refresh_token.clone();
    let mut refreshes = Vec::new();
    for _ in 0..4 {
        let response = refresh(&app, &refresh_token).await;
        refreshes.push(response.status().as_u16());
        if response.status() == 200 {
            refresh_token = response.json::<TokenPair>().await.unwrap().refresh_token;
        }
    }
    assert_eq!(refreshes, [200, 200, 200, 429]);
}

#[tokio::test]
async fn the_retention_job_prunes_expired_tickets_tokens_and_ended_sessions() {
    let app = spawn_app_with(|settings| {
        settings.access_token_ttl = Duration::from_secs(1);
        settings.refresh_token_ttl = Duration::from_secs(1);
        settings.ticket_ttl = Duration::from_secs(1);
    })
    .await;
    let user = app.register().await;
    app.ticket(&user, json!({})).await;
    let response = app
        .post_json("/auth/logout", Some(user.token()), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Ended sessions are kept for the retention window; with none, they go now.
    let removed = app.state.auth.prune(Duration::ZERO).await.unwrap();
    assert!(removed >= 3, "ticket, refresh token and session: {removed}");
    assert_eq!(app.state.auth.prune(Duration::ZERO).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_of_a_logged_out_session_ends_with_an_error_event() {
    let app = spawn_app_with(|settings| {
        // A run long enough to still be going when the session ends.
        settings.template_stream_delay = Duration::from_millis(200);
    })
    .await;
    let victim = app.register().await;
    let mut ws = app.ws_connect(&victim).await;
    let run = ws.start_run_id("How can I reduce my LLM costs?").await;
    // The attacker follows the run with the stolen token.
    let stream = app
        .http
        .get(app.url(&format!("/api/runs/{run}/events")))
        .bearer_auth(victim.token())
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let response = app
        .post_json("/auth/logout", Some(victim.token()), &json!({}))
        .await;
    assert_eq!(response.status(), 204);
    let body = tokio::time::timeout(SESSION_END_BOUND, stream.text())
        .await
        .expect("the stream of the logged-out session must end")
        .unwrap();
    assert!(body.contains("event: error"), "{body}");
    assert!(body.contains("session_ended"), "{body}");
    assert!(
        !body.contains("\"agent_name\":\"supervisor\",\"status\""),
        "the run had not ended; its terminal event must not be what ended the stream: {body}"
    );
}
