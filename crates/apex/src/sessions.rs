//! `apex sessions`: see where your account is logged in, end one session, or log out
//! everywhere (the CLI side of `GET /auth/sessions`, `DELETE /auth/sessions/{id}` and
//! `POST /auth/logout-all`).
//!
//! Each command logs in to ask, which starts a session of its own; it is ended again when
//! the command is done (unless `logout-all` already did), so using the CLI leaves no session
//! behind. In the list it is marked "(this command)".

use anyhow::bail;
use apex_protocol::auth::SessionInfo;

use crate::account::{describe_error, AccountArgs};

#[derive(clap::Subcommand)]
pub enum SessionsCommand {
    /// List the account's active sessions, newest first.
    ///
    /// Example: APEX_PASSWORD=... apex sessions list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// End one session (its tokens stop working and its open connections close).
    ///
    /// Example: APEX_PASSWORD=... apex sessions revoke --email me@example.com SESSION_ID
    #[command(verbatim_doc_comment)]
    Revoke {
        /// A session id from `apex sessions list`.
        // Ids are base64url, so one in 32 starts with '-': it is still the id, not a flag.
        #[arg(allow_hyphen_values = true)]
        session_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// End every session of the account: log out everywhere.
    ///
    /// Example: APEX_PASSWORD=... apex sessions logout-all --email me@example.com
    #[command(verbatim_doc_comment)]
    LogoutAll {
        #[command(flatten)]
        account: AccountArgs,
    },
}

pub async fn run(command: SessionsCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let (account, outcome) = match command {
        SessionsCommand::List { account } => {
            let token = account.authenticate().await?.access_token;
            let outcome = list(&http, &account, &token).await;
            (account, Some((token, outcome)))
        }
        SessionsCommand::Revoke {
            session_id,
            account,
        } => {
            let token = account.authenticate().await?.access_token;
            let outcome = revoke(&http, &account, &token, &session_id).await;
            (account, Some((token, outcome)))
        }
        SessionsCommand::LogoutAll { account } => {
            let token = account.authenticate().await?.access_token;
            let response = http
                .post(format!("{}/auth/logout-all", account.base_url()))
                .bearer_auth(&token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("logout-all refused: {}", describe_error(response).await);
            }
            println!("every session of {} has ended", account.email);
            (account, None)
        }
    };
    let Some((token, outcome)) = outcome else {
        return Ok(());
    };
    // The command's own session ends whatever happened; a failure to end it is not the
    // command's failure.
    let _ = http
        .post(format!("{}/auth/logout", account.base_url()))
        .bearer_auth(&token)
        .send()
        .await;
    outcome
}

async fn list(http: &reqwest::Client, account: &AccountArgs, token: &str) -> anyhow::Result<()> {
    let response = http
        .get(format!("{}/auth/sessions", account.base_url()))
        .bearer_auth(token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "listing sessions refused: {}",
            describe_error(response).await
        );
    }
    let sessions: Vec<SessionInfo> = response.json().await?;
    println!(
        "{:<44} {:<21} {:<21} CLIENT",
        "SESSION", "STARTED", "LAST USED"
    );
    for session in sessions {
        let client = session.user_agent.as_deref().unwrap_or("-");
        let marker = if session.current {
            " (this command)"
        } else {
            ""
        };
        println!(
            "{:<44} {:<21} {:<21} {}{}",
            crate::terminal::clean(&session.id),
            short_time(&session.created_at),
            short_time(&session.last_used_at),
            crate::terminal::clean(client),
            marker
        );
    }
    Ok(())
}

async fn revoke(
    http: &reqwest::Client,
    account: &AccountArgs,
    token: &str,
    session_id: &str,
) -> anyhow::Result<()> {
    let response = http
        .delete(format!(
            "{}/auth/sessions/{}",
            account.base_url(),
            urlencoding_path(session_id)
        ))
        .bearer_auth(token)
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "revoking the session refused: {}",
            describe_error(response).await
        );
    }
    println!("session {session_id} has ended");
    Ok(())
}

/// `2026-12-05T07:09:27Z` from an RFC 3339 time (seconds, no fraction).
pub(crate) fn short_time(rfc3339: &str) -> String {
    let printable = crate::terminal::clean(rfc3339);
    match printable.split_once('.') {
        Some((seconds, _)) => format!("{seconds}Z"),
        None => printable,
    }
}

/// An id as one path segment: session and key ids are URL-safe, anything else is escaped.
pub(crate) fn urlencoding_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::SessionsCommand;

    #[derive(Parser)]
    struct Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    }

    #[test]
    fn a_session_id_starting_with_a_dash_is_the_id_not_a_flag() {
        let parsed = Sessions::try_parse_from([
            "sessions",
            "revoke",
            "-aZ3_x",
            "--email",
            "me@example.com",
            "--password",
            "a long enough password",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        match parsed.command {
            SessionsCommand::Revoke { session_id, .. } => assert_eq!(session_id, "-aZ3_x"),
            _ => panic!("not a revoke"),
        }
    }
}
