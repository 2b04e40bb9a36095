//! Signing in from the CLI: the account flags shared by `chat` and `usage`, and the
//! register-or-login call that turns them into a token pair.

use anyhow::{bail, Context as _};
use apex_protocol::auth::{LoginRequest, RegisterRequest, TokenPair};
use apex_protocol::error::ErrorBody;

#[derive(clap::Args)]
pub struct AccountArgs {
    /// Base URL of the server.
    #[arg(long, env = "APEX_SERVER", default_value = "http://127.0.0.1:8000")]
    pub server: String,
    /// Account email.
    #[arg(long, env = "APEX_EMAIL")]
    pub email: String,
    /// Account password (prefer the environment variable; flags show up in `ps`).
    #[arg(long, env = "APEX_PASSWORD", hide_env_values = true)]
    pub password: String,
    /// Create the account first.
    #[arg(long)]
    pub register: bool,
    /// Display name when registering.
    #[arg(long)]
    pub name: Option<String>,
}

impl AccountArgs {
    pub fn base_url(&self) -> &str {
        self.server.trim_end_matches('/')
    }

    /// Registers (with `--register`) or logs in; a refusal is reported with its error code.
    pub async fn authenticate(&self) -> anyhow::Result<TokenPair> {
        let http = reqwest::Client::new();
        let base = self.base_url();
        let response = if self.register {
            http.post(format!("{base}/auth/register"))
                .json(&RegisterRequest {
                    email: self.email.clone(),
                    password: self.password.clone(),
                    name: self.name.clone(),
                })
                .send()
                .await
        } else {
            http.post(format!("{base}/auth/login"))
                .json(&LoginRequest {
                    email: self.email.clone(),
                    password: self.password.clone(),
                })
                .send()
                .await
        }
        .with_context(|| format!("connecting to {base}"))?;
        if !response.status().is_success() {
            bail!("authentication failed: {}", describe_error(response).await);
        }
        Ok(response.json().await?)
    }
}

/// "message (code)" from an error response, or the bare status; safe to print.
pub async fn describe_error(response: reqwest::Response) -> String {
    let status = response.status();
    response
        .json::<ErrorBody>()
        .await
        .map(|b| {
            format!(
                "{} ({})",
                crate::terminal::clean(&b.error.message),
                crate::terminal::clean(&b.error.code)
            )
        })
        .unwrap_or_else(|_| status.to_string())
}
