//! Authentication bodies: registration, login, refresh, the token pair and WebSocket tickets.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RegisterRequest {
    #[schema(example = "me@example.com")]
    pub email: String,
    /// At least 8 characters.
    #[schema(example = "a long password")]
    pub password: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LoginRequest {
    #[schema(example = "me@example.com")]
    pub email: String,
    #[schema(example = "a long password")]
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// The public view of an account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UserInfo {
    pub id: String,
    pub email: String,
    pub name: Option<String>,
}

/// Answer of register, login and refresh.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    /// Always `"Bearer"`.
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    pub user: UserInfo,
}

/// Body of `POST /api/websocket/ticket`; every field is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct TicketRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub single_use: Option<bool>,
}

/// A short-lived WebSocket ticket: `GET /ws?ticket=<ticket_id>` authenticates with it,
/// so the long-lived JWT never appears in a URL (and so never in an access log).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TicketResponse {
    pub ticket_id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds.
    pub created_at: i64,
    pub ttl_seconds: u64,
    pub single_use: bool,
    pub websocket_url: String,
}

/// One active login session of the caller (`GET /auth/sessions`). A session is the family
/// of refresh tokens rotated from one login; ending it (`DELETE /auth/sessions/{id}`)
/// ends its tokens, tickets and open sockets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SessionInfo {
    pub id: String,
    /// RFC 3339.
    pub created_at: String,
    /// When a token of it was last refreshed (RFC 3339).
    pub last_used_at: String,
    /// The absolute end of the session, whatever rotation happens (RFC 3339).
    pub expires_at: String,
    /// What the client said it was when it logged in.
    pub user_agent: Option<String>,
    /// Whether this is the session of the token that asked.
    pub current: bool,
}

/// What an API key may do. A key works as a bearer token on the routes of its scopes and
/// on no other (not on accounts, sessions, keys, settings or the WebSocket).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
pub enum ApiKeyScope {
    /// Threads, messages and runs over REST (events as JSON or a stream), and
    /// `/v1/models`, `/v1/chat/completions`.
    #[serde(rename = "chat")]
    Chat,
    /// `GET /api/usage/summary` and `GET /api/usage/daily`.
    #[serde(rename = "usage:read")]
    UsageRead,
    /// `POST /api/usage/events`: rows stored as the key's user's, whatever they say.
    #[serde(rename = "usage:write")]
    UsageWrite,
    /// `/v1/chat/completions` and `/v1/embeddings` with an upstream's model: the LLM
    /// gateway, each call recorded as the key's user's usage.
    #[serde(rename = "gateway")]
    Gateway,
}

impl ApiKeyScope {
    pub const ALL: [ApiKeyScope; 4] = [
        ApiKeyScope::Chat,
        ApiKeyScope::UsageRead,
        ApiKeyScope::UsageWrite,
        ApiKeyScope::Gateway,
    ];

    /// The wire (and stored) name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiKeyScope::Chat => "chat",
            ApiKeyScope::UsageRead => "usage:read",
            ApiKeyScope::UsageWrite => "usage:write",
            ApiKeyScope::Gateway => "gateway",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// `POST /api/keys`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateApiKeyRequest {
    /// 1 to 100 characters, to recognise the key by.
    #[schema(example = "nightly usage export")]
    pub name: String,
    /// At least one.
    pub scopes: Vec<ApiKeyScope>,
    /// 1 to 3,650; absent: the key does not expire (revoke it when it is no longer needed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_days: Option<u32>,
}

/// A key as `GET /api/keys` lists it: never the key itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    /// The key's first characters (`apx_` and 8 more), to tell keys apart.
    pub prefix: String,
    pub scopes: Vec<ApiKeyScope>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub expires_at: Option<String>,
    /// Within a minute.
    pub last_used_at: Option<String>,
}

/// Answer of `POST /api/keys` (201): the key, shown this once, and what is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CreatedApiKey {
    /// `apx_` and 48 hexadecimal characters. Only its digest is stored: keep it now.
    pub key: String,
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<ApiKeyScope>,
    pub created_at: String,
    pub expires_at: Option<String>,
}
