//! `Authenticator`: registration, login, sessions (token rotation with reuse detection,
//! logout, logout-all, the sessions list), tickets.
//!
//! Shared by every request; it holds only immutable keys and settings plus the store.

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::auth::{SessionInfo, TicketResponse, TokenPair, UserInfo};
use base64::Engine;
use rand::RngCore;

use super::password::PasswordHasher;
use super::session_watch::SessionWatch;
use super::tokens::{Claims, TokenKeys, TokenType, AUDIENCE, ISSUER};
use super::AuthenticatedUser;
use crate::clock::{ms_to_rfc3339, now_ms};
use crate::ids::UserId;
use crate::settings::{DevLoginEnabled, Secret};
use crate::store::{
    RefreshRotation, SessionEndReason, SessionRecord, Store, StoreError, TicketRecord, UserRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{0}")]
    Validation(String),
    #[error("an account with this email already exists")]
    EmailTaken,
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("token is invalid, expired or revoked")]
    InvalidToken,
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for AuthError {
    fn from(err: StoreError) -> Self {
        AuthError::Internal(err.into())
    }
}

pub struct Authenticator {
    pub(super) store: Arc<dyn Store>,
    keys: TokenKeys,
    hasher: PasswordHasher,
    lifetimes: AuthLifetimes,
    /// Streams of this instance bound to their sessions, ended when the session ends.
    pub(super) sessions: Arc<SessionWatch>,
    /// A hash of a random password, verified against when an email is unknown so that a
    /// login for a missing account takes as long as one with a wrong password.
    dummy_hash: String,
}

/// The account of the development login: the one the original web client's automatic
/// login and "Quick Dev Login" button ask for (with the password `dev`).
pub const DEV_ACCOUNT_EMAIL: &str = "dev@example.com";

/// Whether `email` names the dev account (as registration would normalize it).
pub fn is_dev_account(email: &str) -> bool {
    normalize_email(email).is_ok_and(|email| email == DEV_ACCOUNT_EMAIL)
}

/// Largest accepted ticket lifetime, whatever the client asks.
const MAX_TICKET_TTL_SECS: u64 = 600;

/// Most sockets one multi-use ticket opens. A page that reconnects asks for a new ticket
/// each time; without a cap, one leaked ticket opened sockets until the user's connection
/// cap was full and their own page was refused.
pub const MAX_TICKET_USES: u32 = 5;

fn normalize_email(email: &str) -> Result<String, AuthError> {
    let email = email.trim().to_ascii_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.contains('@')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(AuthError::Validation(
            "email must be a valid address".into(),
        ))
    }
}

/// Tickets are stored as SHA-256 digests: a leaked database row cannot be replayed, and
/// looking one up by digest gives a timing side channel nothing to learn about the ticket.
fn ticket_digest(ticket_id: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(ticket_id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn random_token_id() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Checks a new account's fields by the registration rules: a valid email (returned
/// normalized: trimmed, lower case), a password of 8 to 1024 characters, an optional name
/// (returned trimmed, `None` if blank) of at most 200 characters.
pub fn validate_new_account(
    email: &str,
    password: &str,
    name: Option<&str>,
) -> Result<(String, Option<String>), AuthError> {
    let email = normalize_email(email)?;
    if !(8..=1024).contains(&password.chars().count()) {
        return Err(AuthError::Validation(
            "password must be 8 to 1024 characters".into(),
        ));
    }
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    if name.is_some_and(|n| n.chars().count() > 200) {
        return Err(AuthError::Validation(
            "name must be at most 200 characters".into(),
        ));
    }
    // PostgreSQL cannot store U+0000 in text; refuse it on every engine alike.
    if name.is_some_and(|n| n.contains('\0')) {
        return Err(AuthError::Validation(
            "name must not contain NUL characters".into(),
        ));
    }
    Ok((email, name.map(str::to_string)))
}

/// Creates an account after [`validate_new_account`]: hashes the password and stores the
/// user. An email that has an account already is [`AuthError::EmailTaken`]. Registration
/// and `apex user create` both come here; neither issues tokens nor adds demo data.
pub async fn create_account(
    store: &dyn Store,
    hasher: &PasswordHasher,
    email: &str,
    password: &str,
    name: Option<&str>,
) -> Result<UserRecord, AuthError> {
    let (email, name) = validate_new_account(email, password, name)?;
    let password_hash = hasher.hash(password.to_string()).await?;
    let user = UserRecord {
        id: UserId::generate(),
        email,
        name,
        password_hash,
        created_at_ms: now_ms(),
    };
    match store.create_user(&user).await {
        Ok(()) => Ok(user),
        Err(StoreError::Conflict) => Err(AuthError::EmailTaken),
        Err(err) => Err(err.into()),
    }
}

/// How long each credential lives.
#[derive(Debug, Clone, Copy)]
pub struct AuthLifetimes {
    pub access: Duration,
    /// How long a refresh token may go unused (each rotation issues a fresh one).
    pub refresh: Duration,
    /// Default lifetime of a WebSocket ticket.
    pub ticket: Duration,
    /// The absolute lifetime of a session: after it, log in again, however often the tokens
    /// were refreshed.
    pub session: Duration,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What a client said it was at login, as the sessions list shows it: printable characters
/// only, at most 200 of them.
fn user_agent_label(raw: Option<&str>) -> Option<String> {
    let label: String = raw?.chars().filter(|c| !c.is_control()).take(200).collect();
    let label = label.trim();
    (!label.is_empty()).then(|| label.to_string())
}

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        secret: &Secret,
        hasher: PasswordHasher,
        lifetimes: AuthLifetimes,
    ) -> Self {
        Self {
            sessions: SessionWatch::new(Arc::clone(&store)),
            store,
            keys: TokenKeys::new(secret),
            dummy_hash: hasher.hash_blocking(&random_token_id()),
            hasher,
            lifetimes,
        }
    }

    /// The streams bound to sessions on this instance.
    pub fn sessions(&self) -> &Arc<SessionWatch> {
        &self.sessions
    }

    pub async fn register(
        &self,
        email: &str,
        password: &str,
        name: Option<&str>,
        user_agent: Option<&str>,
    ) -> Result<(TokenPair, AuthenticatedUser), AuthError> {
        let user = create_account(self.store.as_ref(), &self.hasher, email, password, name).await?;
        self.start_session(&user, user_agent).await
    }

    pub async fn login(
        &self,
        email: &str,
        password: &str,
        user_agent: Option<&str>,
    ) -> Result<TokenPair, AuthError> {
        let email = normalize_email(email).map_err(|_| AuthError::InvalidCredentials)?;
        let user = self.store.find_user_by_email(&email).await?;
        let Some(user) = user else {
            // Spend the same time as a real check so timing does not reveal accounts.
            let _ = self
                .hasher
                .verify(password.to_string(), self.dummy_hash.clone())
                .await;
            return Err(AuthError::InvalidCredentials);
        };
        if !self
            .hasher
            .verify(password.to_string(), user.password_hash.clone())
            .await?
        {
            return Err(AuthError::InvalidCredentials);
        }
        Ok(self.start_session(&user, user_agent).await?.0)
    }

    /// Logs in to the dev account ([`DEV_ACCOUNT_EMAIL`]), creating it on first use; the
    /// `bool` says whether it was created.
    ///
    /// No password is checked and no password rule applies: in development mode the dev
    /// account is open to whoever reaches the server, which is what it is for (the client
    /// that uses it sends the password `dev`). Outside development mode it cannot be
    /// entered at all: this takes a [`DevLoginEnabled`], which only
    /// [`Settings::dev_login_enabled`](crate::settings::Settings::dev_login_enabled) makes,
    /// and the password stored for it is random and never told, so `/auth/login` does not
    /// open it even when a development database is later served in production. No hash is
    /// computed to log in, so the flow needs no login throttle.
    pub async fn dev_account_login(
        &self,
        _proof: DevLoginEnabled,
        user_agent: Option<&str>,
    ) -> Result<(TokenPair, AuthenticatedUser, bool), AuthError> {
        if let Some(user) = self.store.find_user_by_email(DEV_ACCOUNT_EMAIL).await? {
            let (pair, identity) = self.start_session(&user, user_agent).await?;
            return Ok((pair, identity, false));
        }
        let user = UserRecord {
            id: UserId::generate(),
            email: DEV_ACCOUNT_EMAIL.to_string(),
            name: Some("Dev User".to_string()),
            password_hash: self.hasher.hash(random_token_id()).await?,
            created_at_ms: now_ms(),
        };
        let (user, created) = match self.store.create_user(&user).await {
            Ok(()) => (user, true),
            // A concurrent first login created it: log in to that one.
            Err(StoreError::Conflict) => (
                self.store
                    .find_user_by_email(DEV_ACCOUNT_EMAIL)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("the dev account exists and cannot be found"))?,
                false,
            ),
            Err(err) => return Err(err.into()),
        };
        let (pair, identity) = self.start_session(&user, user_agent).await?;
        Ok((pair, identity, created))
    }

    /// Rotation with reuse detection: the presented refresh token is spent and a new pair
    /// issued in the same session, expiring no later than the session. A token presented
    /// after it was spent ends its session: either the client or a thief holds a copy, and
    /// neither can tell which, so both must log in again.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, AuthError> {
        let claims = self
            .keys
            .verify(refresh_token)
            .filter(|c| c.token_type == TokenType::Refresh)
            .ok_or(AuthError::InvalidToken)?;
        let user_id = UserId::parse(&claims.sub).map_err(|_| AuthError::InvalidToken)?;
        let now = now_ms();
        let new_jti = uuid::Uuid::new_v4().to_string();
        let rotation = self
            .store
            .rotate_refresh_token(
                &claims.jti,
                user_id,
                &new_jti,
                now.saturating_add(millis(self.lifetimes.refresh)),
                now,
            )
            .await?;
        let session = match rotation {
            RefreshRotation::Rotated { session } => session,
            RefreshRotation::Reused { session_id } => {
                tracing::warn!(
                    user = %user_id,
                    "a spent refresh token was presented again; its session is ended"
                );
                self.sessions.mark_ended([session_id.as_str()]);
                return Err(AuthError::InvalidToken);
            }
            RefreshRotation::Invalid => return Err(AuthError::InvalidToken),
        };
        let user = self
            .store
            .get_user(user_id)
            .await?
            .ok_or(AuthError::InvalidToken)?;
        Ok(self.sign_pair(&user, &session, &new_jti)?.0)
    }

    /// Ends the caller's session: its tokens, tickets and open streams, on every instance.
    pub async fn logout(&self, user: &AuthenticatedUser) -> Result<(), AuthError> {
        self.end_session(user, user.session_id(), SessionEndReason::Logout)
            .await
            .map(|_| ())
    }

    /// Ends every session of the caller, this one included.
    pub async fn logout_all(&self, user: &AuthenticatedUser) -> Result<usize, AuthError> {
        let ended = self
            .store
            .end_all_sessions(user.user_id(), SessionEndReason::LogoutAll, now_ms())
            .await?;
        self.sessions.mark_ended(ended.iter().map(String::as_str));
        Ok(ended.len())
    }

    /// Ends one of the caller's sessions; `false` when they have no active session `id`
    /// (someone else's answers the same).
    pub async fn revoke_session(
        &self,
        user: &AuthenticatedUser,
        id: &str,
    ) -> Result<bool, AuthError> {
        self.end_session(user, id, SessionEndReason::Revoked).await
    }

    async fn end_session(
        &self,
        user: &AuthenticatedUser,
        id: &str,
        reason: SessionEndReason,
    ) -> Result<bool, AuthError> {
        let ended = self
            .store
            .end_session(user.user_id(), id, reason, now_ms())
            .await?;
        if ended {
            self.sessions.mark_ended([id]);
        }
        Ok(ended)
    }

    /// The caller's active sessions, newest first.
    pub async fn list_sessions(
        &self,
        user: &AuthenticatedUser,
    ) -> Result<Vec<SessionInfo>, AuthError> {
        let sessions = self.store.list_sessions(user.user_id(), now_ms()).await?;
        Ok(sessions
            .into_iter()
            .map(|session| SessionInfo {
                current: session.id == user.session_id(),
                id: session.id,
                created_at: ms_to_rfc3339(session.created_at_ms),
                last_used_at: ms_to_rfc3339(session.last_used_at_ms),
                expires_at: ms_to_rfc3339(session.expires_at_ms),
                user_agent: session.user_agent,
            })
            .collect())
    }

    /// Verifies an access token: signature, expiry, issuer, audience, type, and that its
    /// session is active and belongs to the token's subject (so a validly signed token for
    /// a user that does not exist is refused like any other bad token).
    pub async fn verify_access(&self, token: &str) -> Result<AuthenticatedUser, AuthError> {
        let claims = self
            .keys
            .verify(token)
            .filter(|c| c.token_type == TokenType::Access)
            .ok_or(AuthError::InvalidToken)?;
        let user_id = UserId::parse(&claims.sub).map_err(|_| AuthError::InvalidToken)?;
        let session_id = claims.sid.ok_or(AuthError::InvalidToken)?;
        let session = self
            .store
            .get_session(&session_id)
            .await?
            .filter(|s| s.user_id == user_id && s.is_active(now_ms()))
            .ok_or(AuthError::InvalidToken)?;
        Ok(AuthenticatedUser::new(
            user_id,
            session.id,
            claims.exp.saturating_mul(1000).min(session.expires_at_ms),
        ))
    }

    pub async fn user_info(&self, user: &AuthenticatedUser) -> Result<UserInfo, AuthError> {
        let record = self
            .store
            .get_user(user.user_id())
            .await?
            .ok_or(AuthError::InvalidToken)?;
        Ok(user_info(&record))
    }

    /// A ticket for `GET /ws?ticket=`: in the caller's session, living at most as long as
    /// the access token that asked for it (sockets opened with it end then too). A
    /// multi-use ticket opens at most [`MAX_TICKET_USES`] sockets.
    pub async fn issue_ticket(
        &self,
        user: &AuthenticatedUser,
        ttl_seconds: Option<u64>,
        single_use: Option<bool>,
        websocket_url: String,
    ) -> Result<TicketResponse, AuthError> {
        let created_ms = now_ms();
        let remaining_secs =
            u64::try_from((user.credential_expires_at_ms() - created_ms) / 1000).unwrap_or(0);
        let ttl = ttl_seconds
            .unwrap_or(self.lifetimes.ticket.as_secs())
            .clamp(1, MAX_TICKET_TTL_SECS)
            .min(remaining_secs.max(1));
        let single_use = single_use.unwrap_or(true);
        let ticket_id = random_token_id();
        let expires_ms = created_ms + (ttl as i64) * 1000;
        self.store
            .insert_ticket(&TicketRecord {
                id: ticket_digest(&ticket_id),
                user_id: user.user_id(),
                session_id: user.session_id().to_string(),
                expires_at_ms: expires_ms,
                access_expires_at_ms: user.credential_expires_at_ms(),
                max_uses: if single_use { 1 } else { MAX_TICKET_USES },
            })
            .await?;
        Ok(TicketResponse {
            ticket_id,
            expires_at: expires_ms / 1000,
            created_at: created_ms / 1000,
            ttl_seconds: ttl,
            single_use,
            websocket_url,
        })
    }

    pub async fn redeem_ticket(&self, ticket_id: &str) -> Result<AuthenticatedUser, AuthError> {
        if ticket_id.is_empty() || ticket_id.len() > 128 {
            return Err(AuthError::InvalidToken);
        }
        self.store
            .redeem_ticket(&ticket_digest(ticket_id), now_ms())
            .await?
            .map(|ticket| {
                AuthenticatedUser::new(
                    ticket.user_id,
                    ticket.session_id,
                    ticket.access_expires_at_ms,
                )
            })
            .ok_or(AuthError::InvalidToken)
    }

    /// Deletes expired tickets and refresh tokens, and sessions that ended or expired
    /// longer ago than `keep_ended` (the retention job).
    pub async fn prune(&self, keep_ended: Duration) -> Result<u64, AuthError> {
        let now = now_ms();
        Ok(self
            .store
            .prune_sessions(now, now.saturating_sub(millis(keep_ended)))
            .await?)
    }

    /// A new session for `user`, with its first token pair.
    async fn start_session(
        &self,
        user: &UserRecord,
        user_agent: Option<&str>,
    ) -> Result<(TokenPair, AuthenticatedUser), AuthError> {
        let now = now_ms();
        let session = SessionRecord {
            id: random_token_id(),
            user_id: user.id,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(millis(self.lifetimes.session)),
            last_used_at_ms: now,
            ended_at_ms: None,
            user_agent: user_agent_label(user_agent),
        };
        let refresh_jti = uuid::Uuid::new_v4().to_string();
        let (pair, identity) = self.sign_pair(user, &session, &refresh_jti)?;
        self.store
            .create_session(
                &session,
                &refresh_jti,
                now.saturating_add(millis(self.lifetimes.refresh)),
            )
            .await?;
        Ok((pair, identity))
    }

    /// Signs an access token and the refresh token `refresh_jti` (already stored, or stored
    /// by the caller) in `session`, neither outliving it.
    fn sign_pair(
        &self,
        user: &UserRecord,
        session: &SessionRecord,
        refresh_jti: &str,
    ) -> Result<(TokenPair, AuthenticatedUser), AuthError> {
        let now_secs = now_ms() / 1000;
        let session_end_secs = session.expires_at_ms / 1000;
        let access_exp = (now_secs + self.lifetimes.access.as_secs() as i64).min(session_end_secs);
        let refresh_exp =
            (now_secs + self.lifetimes.refresh.as_secs() as i64).min(session_end_secs);
        let claims = |jti: &str, exp: i64, token_type| Claims {
            sub: user.id.to_string(),
            iat: now_secs,
            exp,
            jti: jti.to_string(),
            token_type,
            iss: ISSUER.to_string(),
            aud: AUDIENCE.to_string(),
            sid: Some(session.id.clone()),
        };
        let access_jti = uuid::Uuid::new_v4().to_string();
        let access_token = self
            .keys
            .sign(&claims(&access_jti, access_exp, TokenType::Access))?;
        let refresh_token =
            self.keys
                .sign(&claims(refresh_jti, refresh_exp, TokenType::Refresh))?;
        let pair = TokenPair {
            access_token,
            refresh_token,
            token_type: "Bearer".to_string(),
            expires_in: u64::try_from(access_exp - now_secs).unwrap_or(0),
            user: user_info(user),
        };
        let identity = AuthenticatedUser::new(user.id, session.id.clone(), access_exp * 1000);
        Ok((pair, identity))
    }
}

fn user_info(record: &UserRecord) -> UserInfo {
    UserInfo {
        id: record.id.to_string(),
        email: record.email.clone(),
        name: record.name.clone(),
    }
}
