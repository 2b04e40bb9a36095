//! Password hashing with argon2id, off the async runtime (hashing is deliberately slow).

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::settings::PasswordHashing;

#[derive(Debug, Clone, Copy)]
pub struct PasswordHasher {
    cost: PasswordHashing,
}

impl PasswordHasher {
    pub fn new(cost: PasswordHashing) -> Self {
        Self { cost }
    }

    fn argon2(&self) -> Argon2<'static> {
        let params = match self.cost {
            PasswordHashing::Standard => Params::new(19 * 1024, 2, 1, None),
            PasswordHashing::Light => Params::new(256, 1, 1, None),
        }
        .expect("argon2 parameters are constants within the documented bounds");
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }

    pub async fn hash(&self, password: String) -> anyhow::Result<String> {
        let hasher = *self;
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut OsRng);
            hasher
                .argon2()
                .hash_password(password.as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
        })
        .await?
    }

    /// Synchronous hash for start-up; an empty string (never matches) if hashing fails.
    pub fn hash_blocking(&self, password: &str) -> String {
        let salt = SaltString::generate(&mut OsRng);
        self.argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .unwrap_or_default()
    }

    /// `false` for a wrong password or an unparsable stored hash.
    pub async fn verify(&self, password: String, stored_hash: String) -> anyhow::Result<bool> {
        // Verification reads its parameters from the stored hash, so accounts created
        // with either cost keep working.
        let argon2 = self.argon2();
        Ok(tokio::task::spawn_blocking(move || {
            PasswordHash::new(&stored_hash)
                .map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false)
        })
        .await?)
    }
}
