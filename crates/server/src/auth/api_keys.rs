//! API keys: credentials for programs, acting as the user who made them, on the routes of
//! their scopes only.
//!
//! A key is `apx_` and 48 hexadecimal characters (192 random bits). It is shown once, when
//! made; the store keeps its SHA-256 digest (a high-entropy secret needs no slow hash) and
//! its first characters. Every request with a key looks it up by digest, so a revoked or
//! expired key fails on every instance at once; a stream opened with one is watched like a
//! session ([`super::SessionWatch`], the key's id standing for the session), so it ends
//! within a second of the revocation.
//!
//! What a key may reach is one table, [`required_scope`], by method and route: a route
//! that is not in it (accounts, sessions, keys, settings, tickets, the WebSocket) is closed
//! to every key, so a leaked key can never make keys, log in or change settings.

use apex_protocol::auth::{ApiKeyInfo, ApiKeyScope, CreateApiKeyRequest, CreatedApiKey};
use axum::http::Method;
use rand::RngCore;

use super::service::AuthError;
use super::{AuthenticatedUser, Authenticator};
use crate::clock::{ms_to_rfc3339, now_ms};
use crate::store::ApiKeyRecord;

/// What every key starts with: how a bearer token is told to be a key.
pub const KEY_PREFIX: &str = "apx_";

/// Characters of a key kept (and shown) to tell keys apart: the prefix and 8 more.
const SHOWN_CHARS: usize = KEY_PREFIX.len() + 8;

/// Active keys one user may have.
pub const MAX_KEYS_PER_USER: usize = 50;

/// Longest name, in characters.
const MAX_NAME_CHARS: usize = 100;

/// How precisely a key's last use is recorded (the store skips closer updates too).
const LAST_USED_RESOLUTION_MS: i64 = 60_000;

/// Longest lifetime a key may be given, in days.
const MAX_LIFETIME_DAYS: u32 = 3650;

/// The scope a key needs for `method` on the route `path` (the route's template, e.g.
/// `/api/runs/{id}`); `None`: no key may use it.
pub fn required_scope(method: &Method, path: &str) -> Option<ApiKeyScope> {
    use ApiKeyScope::*;
    let scope = match (method.as_str(), path) {
        (
            "GET",
            "/api/usage/summary" | "/api/usage/daily" | "/api/usage/rows" | "/api/usage/explain"
            | "/api/pricebook",
        ) => UsageRead,
        ("POST", "/api/usage/events" | "/otlp/v1/traces" | "/api/pricebook") => UsageWrite,
        // A `gateway` key passes here too (see `route_accepts`); the handler then asks
        // for the scope of the model named: `gateway` for an upstream's, `chat` for
        // `apex` and the local model.
        (_, "/v1/models" | "/v1/chat/completions") => Chat,
        ("POST", "/v1/embeddings") => Gateway,
        (_, path) if path.starts_with("/api/threads") || path.starts_with("/api/runs") => Chat,
        _ => return None,
    };
    Some(scope)
}

/// Whether a key with `scopes` may reach `route`, whose scope is `needed`.
pub fn route_accepts(scopes: &[ApiKeyScope], needed: ApiKeyScope, route: &str) -> bool {
    scopes.contains(&needed)
        || (matches!(route, "/v1/models" | "/v1/chat/completions")
            && scopes.contains(&ApiKeyScope::Gateway))
}

/// The digest a key is stored and looked up by.
pub(super) fn digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn new_key() -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{KEY_PREFIX}{hex}")
}

/// The listing of a stored key.
pub fn key_info(record: &ApiKeyRecord) -> ApiKeyInfo {
    ApiKeyInfo {
        id: record.id.clone(),
        name: record.name.clone(),
        prefix: record.prefix.clone(),
        scopes: scopes_of(record),
        created_at: ms_to_rfc3339(record.created_at_ms),
        expires_at: record.expires_at_ms.map(ms_to_rfc3339),
        last_used_at: record.last_used_at_ms.map(ms_to_rfc3339),
    }
}

/// The stored scopes a server of this version knows (an unknown one grants nothing).
fn scopes_of(record: &ApiKeyRecord) -> Vec<ApiKeyScope> {
    record
        .scopes
        .iter()
        .filter_map(|s| ApiKeyScope::parse(s))
        .collect()
}

impl Authenticator {
    /// Makes a key for `user` (who must have logged in: keys cannot make keys).
    pub async fn create_api_key(
        &self,
        user: &AuthenticatedUser,
        request: &CreateApiKeyRequest,
    ) -> Result<CreatedApiKey, AuthError> {
        let name = request.name.trim();
        if name.is_empty() || name.chars().count() > MAX_NAME_CHARS || name.contains('\0') {
            return Err(AuthError::Validation(format!(
                "name must be 1 to {MAX_NAME_CHARS} characters"
            )));
        }
        let mut scopes: Vec<ApiKeyScope> = Vec::new();
        for scope in &request.scopes {
            if !scopes.contains(scope) {
                scopes.push(*scope);
            }
        }
        if scopes.is_empty() {
            return Err(AuthError::Validation(
                "scopes must name at least one of chat, usage:read, usage:write".into(),
            ));
        }
        let now = now_ms();
        let expires_at_ms = match request.expires_in_days {
            None => None,
            Some(days) if (1..=MAX_LIFETIME_DAYS).contains(&days) => {
                Some(now + i64::from(days) * 86_400_000)
            }
            Some(_) => {
                return Err(AuthError::Validation(format!(
                    "expires_in_days must be 1 to {MAX_LIFETIME_DAYS}"
                )))
            }
        };
        let active = self.store.list_api_keys(user.user_id(), now).await?;
        if active.len() >= MAX_KEYS_PER_USER {
            return Err(AuthError::Validation(format!(
                "at most {MAX_KEYS_PER_USER} keys at once; revoke one first"
            )));
        }
        let key = new_key();
        let record = ApiKeyRecord {
            id: format!("key_{}", uuid::Uuid::new_v4().simple()),
            user_id: user.user_id(),
            name: name.to_string(),
            prefix: key[..SHOWN_CHARS].to_string(),
            scopes: scopes.iter().map(|s| s.as_str().to_string()).collect(),
            created_at_ms: now,
            expires_at_ms,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        self.store.create_api_key(&record, &digest(&key)).await?;
        tracing::info!(key_id = %record.id, "API key created");
        let info = key_info(&record);
        Ok(CreatedApiKey {
            key,
            id: info.id,
            name: info.name,
            prefix: info.prefix,
            scopes: info.scopes,
            created_at: info.created_at,
            expires_at: info.expires_at,
        })
    }

    /// The caller's active keys, newest first.
    pub async fn list_api_keys(
        &self,
        user: &AuthenticatedUser,
    ) -> Result<Vec<ApiKeyInfo>, AuthError> {
        let keys = self.store.list_api_keys(user.user_id(), now_ms()).await?;
        Ok(keys.iter().map(key_info).collect())
    }

    /// Revokes one of the caller's keys; `false` if it is not theirs or not active. Streams
    /// opened with it here end at once, elsewhere within a second.
    pub async fn revoke_api_key(
        &self,
        user: &AuthenticatedUser,
        id: &str,
    ) -> Result<bool, AuthError> {
        let revoked = self
            .store
            .revoke_api_key(user.user_id(), id, now_ms())
            .await?;
        if revoked {
            self.sessions.mark_ended([id]);
            tracing::info!(key_id = %id, "API key revoked");
        }
        Ok(revoked)
    }

    /// The identity a key stands for, if it is known and active.
    pub async fn verify_api_key(&self, key: &str) -> Result<AuthenticatedUser, AuthError> {
        let now = now_ms();
        let record = self
            .store
            .find_api_key(&digest(key))
            .await?
            .filter(|k| k.is_active(now))
            .ok_or(AuthError::InvalidToken)?;
        // Off the request's path, and only when the stored time is a minute old: most
        // requests of a busy key write nothing.
        if record
            .last_used_at_ms
            .is_none_or(|used| used < now - LAST_USED_RESOLUTION_MS)
        {
            let store = std::sync::Arc::clone(&self.store);
            let id = record.id.clone();
            tokio::spawn(async move {
                if let Err(err) = store.touch_api_key(&id, now).await {
                    tracing::debug!(error = %err, "could not record an API key's use");
                }
            });
        }
        Ok(AuthenticatedUser::for_api_key(
            record.user_id,
            record.id.clone(),
            record.expires_at_ms.unwrap_or(i64::MAX),
            scopes_of(&record),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_routes_of_a_scope_are_open_to_a_key() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(
            required_scope(&get, "/api/usage/summary"),
            Some(ApiKeyScope::UsageRead)
        );
        assert_eq!(
            required_scope(&post, "/api/usage/events"),
            Some(ApiKeyScope::UsageWrite)
        );
        assert_eq!(
            required_scope(&post, "/api/threads/{id}/runs"),
            Some(ApiKeyScope::Chat)
        );
        assert_eq!(
            required_scope(&post, "/v1/chat/completions"),
            Some(ApiKeyScope::Chat)
        );
        for (method, path) in [
            (&post, "/api/keys"),
            (&get, "/api/keys"),
            (&get, "/auth/me"),
            (&post, "/auth/logout"),
            (&get, "/auth/sessions"),
            (&post, "/api/websocket/ticket"),
            (&get, "/api/settings"),
            (&get, "/ws"),
            (&post, "/api/usage/summary"),
        ] {
            assert_eq!(required_scope(method, path), None, "{method} {path}");
        }
    }

    #[test]
    fn keys_are_random_and_stored_only_as_digests() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 48);
        assert_eq!(digest(&a).len(), 64);
        assert!(!digest(&a).contains(&a[KEY_PREFIX.len()..]));
    }
}
