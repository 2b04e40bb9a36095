//! The WebSocket endpoint `GET /ws`: authentication, then one task per connection.
//!
//! Authentication, first match wins: `?ticket=<id>`, `Authorization: Bearer <jwt>`, or the
//! subprotocol `jwt.<base64url(jwt)>` (echoed back). The identity of the connection is fixed
//! here and never changes; nothing a client sends later can alter it.
//!
//! So is its delivery profile: a browser page served from one of `legacy_client.origins`
//! is the original web client, whose frames are paced ([`pacing`]); every other
//! connection gets its frames as fast as they come. The `Origin` header is the signal
//! because a page cannot set it (the browser does), it is there on every upgrade the
//! original client makes, and Apex's own page (same origin), `apex chat` and other
//! programs (no `Origin`) never carry a listed one. The ticket form (`?ticket=`) is no
//! signal: Apex's own page uses it too.
//!
//! Which browser pages may open a socket at all is decided by `origin_allowed`: the
//! server's configured public origins (by default the loopback origins of its port) and
//! the CORS origins, never the request's own `Host` header (DNS rebinding).

mod connection;
mod delivery;
mod error;
pub mod frames;
pub mod pacing;
mod requests;

use apex_protocol::error::{codes, ws_codes, ErrorBody};
use apex_protocol::ws::{ControlFrame, CLOSE_POLICY_VIOLATION};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;

use crate::auth::{bearer_token, AuthError};
use crate::clock::now_rfc3339;
use crate::error::ApiError;
use crate::settings::LegacyClientSettings;
use crate::state::AppState;
use pacing::Pacing;

/// The connection's read buffer, in bytes. tungstenite zero-fills the whole free capacity
/// of its read buffer before every read from the socket; at its default of 128 KiB that
/// fill was 5% of the server's CPU under load (perf, 50 users: `BytesMut::resize` in
/// `FrameCodec::read_frame`), for client frames of a few hundred bytes. A larger frame
/// still fits: the buffer grows to the frame's announced length.
const READ_BUFFER_BYTES: usize = 8 * 1024;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsParams {
    /// A ticket from `POST /api/websocket/ticket` (the first credential looked at).
    ticket: Option<String>,
}

enum Credential {
    Ticket(String),
    Bearer(String),
    Subprotocol { protocol: String, token: String },
    Missing,
}

fn subprotocol_token(headers: &HeaderMap) -> Option<(String, String)> {
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|protocol| {
            let encoded = protocol.strip_prefix("jwt.")?;
            // An undecodable token is still this client's credential: it is echoed and
            // refused with AUTH_FAILED, rather than failing the handshake silently.
            let token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded.trim_end_matches('='))
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .unwrap_or_default();
            Some((protocol.to_string(), token))
        })
}

fn credential(params: &Result<Query<WsParams>, QueryRejection>, headers: &HeaderMap) -> Credential {
    if let Ok(Query(WsParams {
        ticket: Some(ticket),
    })) = params
    {
        return Credential::Ticket(ticket.clone());
    }
    if let Some(token) = bearer_token(headers) {
        return Credential::Bearer(token.to_string());
    }
    if let Some((protocol, token)) = subprotocol_token(headers) {
        return Credential::Subprotocol { protocol, token };
    }
    Credential::Missing
}

/// The origins a browser on this machine reaches a server listening on `port` by: the
/// default of `public_origins`.
pub fn loopback_origins(port: u16) -> Vec<String> {
    vec![
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        format!("http://[::1]:{port}"),
    ]
}

/// Origins compare without a trailing `/` and ignoring ASCII case (scheme and host are
/// case-insensitive).
fn same_origin(listed: &str, origin: &str) -> bool {
    listed
        .trim_end_matches('/')
        .eq_ignore_ascii_case(origin.trim_end_matches('/'))
}

/// Browsers always send `Origin`; a page from another site must not open a socket with
/// the user's credentials. Allowed: no `Origin` (non-browser clients), one of the
/// server's public origins, or a configured CORS origin. The request's `Host` is no
/// evidence: with DNS rebinding, a page of `http://evil.example:PORT` reaches this server
/// with `Host: evil.example:PORT`, its own origin.
fn origin_allowed(headers: &HeaderMap, public: &[String], cors: &[String]) -> bool {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    public.iter().chain(cors).any(|o| same_origin(o, origin))
}

/// The WebSocket URL a ticket names: the public origin whose host is the request's `Host`
/// (so a client that reached the server by one of its names keeps using it), else the
/// first public origin, with `ws`/`wss` for `http`/`https`. Never a name only the `Host`
/// header vouches for.
pub fn ticket_websocket_url(public: &[String], headers: &HeaderMap) -> String {
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let authority = |origin: &str| -> Option<(bool, String)> {
        let origin = origin.trim_end_matches('/');
        if let Some(rest) = origin.strip_prefix("https://") {
            Some((true, rest.to_string()))
        } else {
            origin
                .strip_prefix("http://")
                .map(|rest| (false, rest.to_string()))
        }
    };
    let chosen = public
        .iter()
        .filter_map(|o| authority(o))
        .find(|(_, a)| host.is_some_and(|h| a.eq_ignore_ascii_case(h)))
        .or_else(|| public.iter().find_map(|o| authority(o)));
    match chosen {
        Some((true, authority)) => format!("wss://{authority}/ws"),
        Some((false, authority)) => format!("ws://{authority}/ws"),
        // Not served through `serve` (which always fills the list): a neutral default.
        None => "ws://localhost/ws".to_string(),
    }
}

/// The pacing of a connection whose `Origin` is one of the original web client's (ignoring
/// a trailing `/` and ASCII case; an origin that is not allowed at all never gets here);
/// `None` for any other.
fn delivery_pacing(headers: &HeaderMap, legacy: &LegacyClientSettings) -> Option<Pacing> {
    let origin = headers
        .get(axum::http::header::ORIGIN)?
        .to_str()
        .ok()?
        .trim_end_matches('/');
    legacy
        .origins
        .iter()
        .any(|listed| listed.trim_end_matches('/').eq_ignore_ascii_case(origin))
        .then(|| Pacing::from_settings(legacy))
}

/// Opens the WebSocket. Frames, in both directions, are described in `docs/protocol.md`.
///
/// Credentials, first match wins: `?ticket=`, `Authorization: Bearer`, or the subprotocol
/// `jwt.<base64url(jwt)>` (echoed back). A refused credential still upgrades: the server
/// then sends an `error_message` frame with `AUTH_FAILED` and closes with 1008. A page from
/// a legacy client origin (the original web client) gets its frames paced: see "Clients
/// of the original system" in docs/protocol.md.
#[utoipa::path(
    get,
    path = "/ws",
    operation_id = "open_websocket",
    tag = "websocket",
    security(("bearer_jwt" = []), ("ws_ticket" = [])),
    params(
        WsParams,
        ("Sec-WebSocket-Protocol" = Option<String>, Header, description = "`jwt.<base64url(access token)>`: a third way to authenticate, for browsers"),
    ),
    responses(
        (status = 101, description = "Switching protocols: the socket is open; the first frame is \
            `connection_established` (or `error_message` + close 1008 when authentication failed). \
            See docs/protocol.md for the frames."),
        (status = 400, description = "Not a WebSocket upgrade request (plain text)", content_type = "text/plain", body = String),
        (status = 403, description = "A browser page from an origin that is not allowed (code: `origin_not_allowed`)", body = ErrorBody),
    )
)]
pub async fn upgrade(
    State(state): State<AppState>,
    params: Result<Query<WsParams>, QueryRejection>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(
        &headers,
        &state.settings.public_origins,
        &state.settings.cors_allowed_origins,
    ) {
        return ApiError::client(
            StatusCode::FORBIDDEN,
            codes::ORIGIN_NOT_ALLOWED,
            "this origin may not open a WebSocket",
        )
        .into_response();
    }
    // Decided once, from the upgrade request, like the identity.
    let pacing = delivery_pacing(&headers, &state.settings.legacy_client);
    let limit = state.settings.max_frame_bytes;
    // tungstenite's own limit is set above ours so that we, not it, answer an oversized
    // frame, with close code 1009.
    let ws = ws
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(limit.saturating_mul(4))
        .max_frame_size(limit.saturating_mul(4));
    let (ws, outcome) = match credential(&params, &headers) {
        Credential::Ticket(ticket) => (
            ws,
            state
                .auth
                .redeem_ticket(&ticket)
                .await
                .map_err(|e| (e, "invalid, expired or used ticket")),
        ),
        Credential::Bearer(token) => (
            ws,
            state
                .auth
                .verify_access(&token)
                .await
                .map_err(|e| (e, "invalid or expired token")),
        ),
        Credential::Subprotocol { protocol, token } => (
            ws.protocols([protocol]),
            state
                .auth
                .verify_access(&token)
                .await
                .map_err(|e| (e, "invalid or expired token")),
        ),
        Credential::Missing => (
            ws,
            Err((AuthError::InvalidToken, "authentication required")),
        ),
    };
    match outcome {
        Ok(user) => match state.limits.open_connection(user.user_id()) {
            Some(slot) => {
                ws.on_upgrade(move |socket| connection::serve(socket, state, user, slot, pacing))
            }
            None => ws.on_upgrade(move |socket| {
                crate::telemetry::limit_rejected("too_many_connections");
                reject(
                    socket,
                    ws_codes::TOO_MANY_CONNECTIONS,
                    "too many connections for this user",
                )
            }),
        },
        Err((err, reason)) => {
            if let AuthError::Internal(inner) = &err {
                tracing::error!(error = %format!("{inner:#}"), "websocket authentication failed internally");
            }
            ws.on_upgrade(move |socket| reject(socket, ws_codes::AUTH_FAILED, reason))
        }
    }
}

/// Refuses a connection: an `error_message` frame, then close 1008 with `reason`.
async fn reject(mut socket: WebSocket, code: &'static str, reason: &'static str) {
    let message = if code == ws_codes::AUTH_FAILED {
        format!("authentication failed: {reason}")
    } else {
        reason.to_string()
    };
    let frame = ControlFrame::ErrorMessage {
        error_code: code.into(),
        error_message: message,
        retry_after_ms: None,
        timestamp: now_rfc3339(),
    };
    if let Ok(text) = serde_json::to_string(&frame) {
        let _ = socket.send(Message::Text(text.into())).await;
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: CLOSE_POLICY_VIOLATION,
            reason: reason.into(),
        })))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_listed_origins_pass_whatever_the_host_says() {
        let public = loopback_origins(8000);
        let cors = vec!["https://chat.example.com/".to_string()];
        let allowed =
            |pairs: &[(&'static str, &str)]| origin_allowed(&headers(pairs), &public, &cors);
        assert!(allowed(&[]));
        assert!(allowed(&[("origin", "http://127.0.0.1:8000")]));
        assert!(allowed(&[("origin", "http://LOCALHOST:8000")]));
        assert!(allowed(&[("origin", "http://[::1]:8000")]));
        assert!(allowed(&[("origin", "https://chat.example.com")]));
        // DNS rebinding: the page's own name in both headers.
        assert!(!allowed(&[
            ("origin", "http://evil.example:8000"),
            ("host", "evil.example:8000")
        ]));
        assert!(!allowed(&[("origin", "http://127.0.0.1:8001")]));
        assert!(!allowed(&[("origin", "null")]));
    }

    #[test]
    fn ticket_urls_name_a_public_origin() {
        let public = vec![
            "https://apex.example.com".to_string(),
            "http://127.0.0.1:8000".to_string(),
        ];
        let url = |host: &str| ticket_websocket_url(&public, &headers(&[("host", host)]));
        assert_eq!(url("apex.example.com"), "wss://apex.example.com/ws");
        assert_eq!(url("127.0.0.1:8000"), "ws://127.0.0.1:8000/ws");
        assert_eq!(url("evil.example:8000"), "wss://apex.example.com/ws");
        assert_eq!(
            ticket_websocket_url(&[], &HeaderMap::new()),
            "ws://localhost/ws"
        );
    }
}
