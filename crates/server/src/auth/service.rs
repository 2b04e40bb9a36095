//! `Authenticator`: registration, login, token rotation, logout, tickets.
//!
//! Shared by every request; it holds only immutable keys and settings plus the store.

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::auth::{TicketResponse, TokenPair, UserInfo};
use base64::Engine;
use rand::RngCore;

use super::password::PasswordHasher;
use super::tokens::{Claims, TokenKeys, TokenType, AUDIENCE, ISSUER};
use super::AuthenticatedUser;
use crate::clock::now_ms;
use crate::ids::UserId;
use crate::settings::{DevLoginEnabled, Secret};
use crate::store::{Store, StoreError, UserRecord};

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
    store: Arc<dyn Store>,
    keys: TokenKeys,
    hasher: PasswordHasher,
    access_ttl: Duration,
    refresh_ttl: Duration,
    ticket_ttl: Duration,
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

impl Authenticator {
    pub fn new(
        store: Arc<dyn Store>,
        secret: &Secret,
        hasher: PasswordHasher,
        access_ttl: Duration,
        refresh_ttl: Duration,
        ticket_ttl: Duration,
    ) -> Self {
        Self {
            store,
            keys: TokenKeys::new(secret),
            dummy_hash: hasher.hash_blocking(&random_token_id()),
            hasher,
            access_ttl,
            refresh_ttl,
            ticket_ttl,
        }
    }

    pub async fn register(
        &self,
        email: &str,
        password: &str,
        name: Option<&str>,
    ) -> Result<(TokenPair, AuthenticatedUser), AuthError> {
        let user = create_account(self.store.as_ref(), &self.hasher, email, password, name).await?;
        let pair = self.issue_pair(&user).await?;
        Ok((pair, AuthenticatedUser::from_ticket(user.id)))
    }

    pub async fn login(&self, email: &str, password: &str) -> Result<TokenPair, AuthError> {
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
        self.issue_pair(&user).await
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
    ) -> Result<(TokenPair, AuthenticatedUser, bool), AuthError> {
        if let Some(user) = self.store.find_user_by_email(DEV_ACCOUNT_EMAIL).await? {
            let pair = self.issue_pair(&user).await?;
            return Ok((pair, AuthenticatedUser::from_ticket(user.id), false));
        }
        let user = UserRecord {
            id: UserId::generate(),
            email: DEV_ACCOUNT_EMAIL.to_string(),
            name: Some("Dev User".to_string()),
            password_hash: self.hasher.hash(random_token_id()).await?,
            created_at_ms: now_ms(),
        };
        match self.store.create_user(&user).await {
            Ok(()) => {
                let pair = self.issue_pair(&user).await?;
                Ok((pair, AuthenticatedUser::from_ticket(user.id), true))
            }
            // A concurrent first login created it: log in to that one.
            Err(StoreError::Conflict) => {
                let user = self
                    .store
                    .find_user_by_email(DEV_ACCOUNT_EMAIL)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("the dev account exists and cannot be found"))?;
                let pair = self.issue_pair(&user).await?;
                Ok((pair, AuthenticatedUser::from_ticket(user.id), false))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Rotation: the presented refresh token is revoked and a new pair issued.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, AuthError> {
        let claims = self
            .keys
            .verify(refresh_token)
            .filter(|c| c.token_type == TokenType::Refresh)
            .ok_or(AuthError::InvalidToken)?;
        let user_id = UserId::parse(&claims.sub).map_err(|_| AuthError::InvalidToken)?;
        if !self
            .store
            .consume_refresh_token(&claims.jti, user_id, now_ms())
            .await?
        {
            return Err(AuthError::InvalidToken);
        }
        let user = self
            .store
            .get_user(user_id)
            .await?
            .ok_or(AuthError::InvalidToken)?;
        self.issue_pair(&user).await
    }

    pub async fn logout(&self, user: &AuthenticatedUser) -> Result<(), AuthError> {
        if let Some((jti, expires_at_ms)) = &user.access_token {
            self.store
                .revoke_session(jti, *expires_at_ms, now_ms())
                .await?;
        }
        Ok(())
    }

    /// Verifies an access token: signature, expiry, issuer, audience, type, revocation.
    pub async fn verify_access(&self, token: &str) -> Result<AuthenticatedUser, AuthError> {
        let claims = self
            .keys
            .verify(token)
            .filter(|c| c.token_type == TokenType::Access)
            .ok_or(AuthError::InvalidToken)?;
        let user_id = UserId::parse(&claims.sub).map_err(|_| AuthError::InvalidToken)?;
        if self.store.is_access_token_revoked(&claims.jti).await? {
            return Err(AuthError::InvalidToken);
        }
        Ok(AuthenticatedUser::from_access_token(
            user_id,
            claims.jti,
            claims.exp.saturating_mul(1000),
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

    pub async fn issue_ticket(
        &self,
        user: &AuthenticatedUser,
        ttl_seconds: Option<u64>,
        single_use: Option<bool>,
        websocket_url: String,
    ) -> Result<TicketResponse, AuthError> {
        let ttl = ttl_seconds
            .unwrap_or(self.ticket_ttl.as_secs())
            .clamp(1, MAX_TICKET_TTL_SECS);
        let single_use = single_use.unwrap_or(true);
        let ticket_id = random_token_id();
        let created_ms = now_ms();
        let expires_ms = created_ms + (ttl as i64) * 1000;
        self.store
            .insert_ticket(
                &ticket_digest(&ticket_id),
                user.user_id(),
                expires_ms,
                single_use,
            )
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
            .map(AuthenticatedUser::from_ticket)
            .ok_or(AuthError::InvalidToken)
    }

    async fn issue_pair(&self, user: &UserRecord) -> Result<TokenPair, AuthError> {
        let now_secs = now_ms() / 1000;
        let access_jti = uuid::Uuid::new_v4().to_string();
        let refresh_jti = uuid::Uuid::new_v4().to_string();
        let access_exp = now_secs + self.access_ttl.as_secs() as i64;
        let refresh_exp = now_secs + self.refresh_ttl.as_secs() as i64;
        let claims = |jti: &str, exp: i64, token_type| Claims {
            sub: user.id.to_string(),
            iat: now_secs,
            exp,
            jti: jti.to_string(),
            token_type,
            iss: ISSUER.to_string(),
            aud: AUDIENCE.to_string(),
        };
        let access_token = self
            .keys
            .sign(&claims(&access_jti, access_exp, TokenType::Access))?;
        let refresh_token =
            self.keys
                .sign(&claims(&refresh_jti, refresh_exp, TokenType::Refresh))?;
        self.store
            .insert_refresh_token(&refresh_jti, user.id, &access_jti, refresh_exp * 1000)
            .await?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            token_type: "Bearer".to_string(),
            expires_in: self.access_ttl.as_secs(),
            user: user_info(user),
        })
    }
}

fn user_info(record: &UserRecord) -> UserInfo {
    UserInfo {
        id: record.id.to_string(),
        email: record.email.clone(),
        name: record.name.clone(),
    }
}
