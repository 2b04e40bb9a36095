//! `apex keys`: API keys for programs (the CLI side of `POST /api/keys`, `GET /api/keys`
//! and `DELETE /api/keys/{id}`).
//!
//! Only a login manages keys, so each command logs in, and ends that session again when it
//! is done. `create` prints the key once: only its digest is kept by the server.

use anyhow::bail;
use apex_protocol::auth::{ApiKeyInfo, ApiKeyScope, CreateApiKeyRequest, CreatedApiKey};

use crate::account::{describe_error, AccountArgs};
use crate::sessions::{short_time, urlencoding_path};
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key; it is printed once. Scopes: chat, usage:read, usage:write, gateway.
    ///
    /// Example: APEX_PASSWORD=... apex keys create --email me@example.com \
    ///              --key-name "nightly export" --scope usage:write --expires-in-days 90
    #[command(verbatim_doc_comment)]
    Create {
        /// What the key is for (1 to 100 characters). (`--name` is the account's name
        /// when registering.)
        #[arg(long)]
        key_name: String,
        /// What the key may do; repeat for several.
        #[arg(long = "scope", required = true, value_parser = parse_scope)]
        scopes: Vec<ApiKeyScope>,
        /// Days until it stops working (1 to 3650); without it, until revoked.
        #[arg(long)]
        expires_in_days: Option<u32>,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List the account's active keys (never the keys themselves).
    ///
    /// Example: APEX_PASSWORD=... apex keys list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Revoke a key: it stops working at once, everywhere.
    ///
    /// Example: APEX_PASSWORD=... apex keys revoke --email me@example.com KEY_ID
    #[command(verbatim_doc_comment)]
    Revoke {
        /// A key id from `apex keys list`.
        key_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
}

fn parse_scope(name: &str) -> Result<ApiKeyScope, String> {
    ApiKeyScope::parse(name).ok_or_else(|| {
        let known: Vec<&str> = ApiKeyScope::ALL.iter().map(|s| s.as_str()).collect();
        format!("unknown scope {name:?}; one of {}", known.join(", "))
    })
}

pub async fn run(command: KeysCommand) -> anyhow::Result<()> {
    let account = match &command {
        KeysCommand::Create { account, .. }
        | KeysCommand::List { account }
        | KeysCommand::Revoke { account, .. } => account,
    };
    let token = account.authenticate().await?.access_token;
    let http = reqwest::Client::new();
    let base = account.base_url();
    let outcome = match &command {
        KeysCommand::Create {
            key_name,
            scopes,
            expires_in_days,
            ..
        } => {
            let body = CreateApiKeyRequest {
                name: key_name.clone(),
                scopes: scopes.clone(),
                expires_in_days: *expires_in_days,
            };
            create(&http, base, &token, &body).await
        }
        KeysCommand::List { .. } => list(&http, base, &token).await,
        KeysCommand::Revoke { key_id, .. } => revoke(&http, base, &token, key_id).await,
    };
    // The command's own session ends whatever happened.
    let _ = http
        .post(format!("{base}/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await;
    outcome
}

async fn create(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    body: &CreateApiKeyRequest,
) -> anyhow::Result<()> {
    let response = http
        .post(format!("{base}/api/keys"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "creating the key refused: {}",
            describe_error(response).await
        );
    }
    let created: CreatedApiKey = response.json().await?;
    println!("{}", clean(&created.key));
    eprintln!(
        "key {} ({}) made; this is the only time it is shown: keep it now",
        clean(&created.id),
        clean(&created.name)
    );
    Ok(())
}

async fn list(http: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<()> {
    let response = http
        .get(format!("{base}/api/keys"))
        .bearer_auth(token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("listing keys refused: {}", describe_error(response).await);
    }
    let keys: Vec<ApiKeyInfo> = response.json().await?;
    println!(
        "{:<37} {:<13} {:<28} {:<21} {:<21} NAME",
        "KEY", "PREFIX", "SCOPES", "CREATED", "LAST USED"
    );
    for key in keys {
        let scopes: Vec<&str> = key.scopes.iter().map(|s| s.as_str()).collect();
        println!(
            "{:<37} {:<13} {:<28} {:<21} {:<21} {}",
            clean(&key.id),
            clean(&key.prefix),
            scopes.join(","),
            short_time(&key.created_at),
            key.last_used_at.as_deref().map_or("-".into(), short_time),
            clean(&key.name)
        );
    }
    Ok(())
}

async fn revoke(http: &reqwest::Client, base: &str, token: &str, id: &str) -> anyhow::Result<()> {
    let response = http
        .delete(format!("{base}/api/keys/{}", urlencoding_path(id)))
        .bearer_auth(token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "revoking the key refused: {}",
            describe_error(response).await
        );
    }
    println!("key {} is revoked", clean(id));
    Ok(())
}
