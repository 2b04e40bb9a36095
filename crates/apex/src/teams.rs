//! `apex teams`: make a team, invite people, join one, list members and (owners and
//! admins) the team's usage per member. The CLI side of `/api/teams`; a login, like the
//! routes it calls, ended again when the command is done.

use anyhow::bail;
use apex_protocol::teams::{
    ChangeRole, CreateInvite, CreateTeam, Invite, JoinTeam, Team, TeamMember, TeamUsage,
};
use serde::de::DeserializeOwned;

use crate::account::{describe_error, AccountArgs};
use crate::sessions::urlencoding_path;
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum TeamsCommand {
    /// Make a team; you are its owner.
    ///
    /// Example: APEX_PASSWORD=... apex teams create --email me@example.com Platform
    #[command(verbatim_doc_comment)]
    Create {
        team_name: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List your teams and your role in each.
    ///
    /// Example: APEX_PASSWORD=... apex teams list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Make a single-use invite (printed once) for someone to join as a member or admin.
    ///
    /// Example: APEX_PASSWORD=... apex teams add --email me@example.com TEAM_ID --role admin
    #[command(verbatim_doc_comment, alias = "invite")]
    Add {
        team_id: String,
        /// member or admin.
        #[arg(long, default_value = "member")]
        role: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Join a team with an invite.
    ///
    /// Example: APEX_PASSWORD=... apex teams join --email you@example.com apt_…
    #[command(verbatim_doc_comment)]
    Join {
        token: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List a team's members.
    ///
    /// Example: APEX_PASSWORD=... apex teams members --email me@example.com TEAM_ID
    #[command(verbatim_doc_comment)]
    Members {
        team_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Change a member's role to admin or member (the owner only).
    ///
    /// Example: APEX_PASSWORD=... apex teams role --email me@example.com TEAM_ID USER_ID --role admin
    #[command(verbatim_doc_comment)]
    Role {
        team_id: String,
        /// A member's user id (from `apex teams members`).
        user_id: String,
        /// admin or member.
        #[arg(long)]
        role: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// A team's usage as totals per member (owners and admins).
    ///
    /// Example: APEX_PASSWORD=... apex teams usage --email me@example.com TEAM_ID --days 7
    #[command(verbatim_doc_comment)]
    Usage {
        team_id: String,
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[command(flatten)]
        account: AccountArgs,
    },
}

async fn answer<T: DeserializeOwned>(response: reqwest::Response, what: &str) -> anyhow::Result<T> {
    if !response.status().is_success() {
        bail!("{what} refused: {}", describe_error(response).await);
    }
    Ok(response.json().await?)
}

pub async fn run(command: TeamsCommand) -> anyhow::Result<()> {
    let account = match &command {
        TeamsCommand::Create { account, .. }
        | TeamsCommand::List { account }
        | TeamsCommand::Add { account, .. }
        | TeamsCommand::Join { account, .. }
        | TeamsCommand::Members { account, .. }
        | TeamsCommand::Role { account, .. }
        | TeamsCommand::Usage { account, .. } => account,
    };
    let token = account.authenticate().await?.access_token;
    let http = reqwest::Client::new();
    let base = account.base_url();
    let team_url =
        |id: &str, rest: &str| format!("{base}/api/teams/{}{rest}", urlencoding_path(id));
    let outcome = async {
        match &command {
            TeamsCommand::Create { team_name, .. } => {
                let response = http
                    .post(format!("{base}/api/teams"))
                    .bearer_auth(&token)
                    .json(&CreateTeam { name: team_name.clone() })
                    .send()
                    .await?;
                let team: Team = answer(response, "making the team").await?;
                println!("{}  {} (you are its {})", clean(&team.id), clean(&team.name), team.role);
            }
            TeamsCommand::List { .. } => {
                let response = http.get(format!("{base}/api/teams")).bearer_auth(&token).send().await?;
                let teams: Vec<Team> = answer(response, "listing teams").await?;
                if teams.is_empty() {
                    println!("no teams");
                }
                for team in teams {
                    println!(
                        "{}  {}  {} members, you: {}",
                        clean(&team.id),
                        clean(&team.name),
                        team.members,
                        team.role
                    );
                }
            }
            TeamsCommand::Add { team_id, role, .. } => {
                let response = http
                    .post(team_url(team_id, "/invites"))
                    .bearer_auth(&token)
                    .json(&CreateInvite { role: Some(role.clone()) })
                    .send()
                    .await?;
                let invite: Invite = answer(response, "inviting").await?;
                println!("{}", clean(&invite.token));
                eprintln!(
                    "invite as {} until {}: shown this once; the person joins with `apex teams join TOKEN`",
                    invite.role, invite.expires_at
                );
            }
            TeamsCommand::Join { token: invite, .. } => {
                let response = http
                    .post(format!("{base}/api/teams/join"))
                    .bearer_auth(&token)
                    .json(&JoinTeam { token: invite.clone() })
                    .send()
                    .await?;
                let team: Team = answer(response, "joining").await?;
                println!("joined {} ({}) as {}", clean(&team.name), clean(&team.id), team.role);
            }
            TeamsCommand::Members { team_id, .. } => {
                let response = http.get(team_url(team_id, "/members")).bearer_auth(&token).send().await?;
                let members: Vec<TeamMember> = answer(response, "listing members").await?;
                for m in members {
                    println!("{}  {:<7}  {}", clean(&m.user_id), m.role, clean(&m.email));
                }
            }
            TeamsCommand::Role {
                team_id,
                user_id,
                role,
                ..
            } => {
                let response = http
                    .patch(team_url(team_id, &format!("/members/{}", urlencoding_path(user_id))))
                    .bearer_auth(&token)
                    .json(&ChangeRole { role: role.clone() })
                    .send()
                    .await?;
                let member: TeamMember = answer(response, "changing the role").await?;
                println!("{} is now {}", clean(&member.email), member.role);
            }
            TeamsCommand::Usage { team_id, days, .. } => {
                let response = http
                    .get(team_url(team_id, &format!("/usage?days={days}")))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                let usage: TeamUsage = answer(response, "the team's usage").await?;
                println!(
                    "last {} days: {} requests, ${:.2}",
                    usage.days, usage.total_requests, usage.total_cost_usd
                );
                for m in usage.members {
                    println!("  {:<40} {:>8} requests  ${:.2}", clean(&m.email), m.requests, m.cost_usd);
                }
            }
        }
        Ok(())
    }
    .await;
    let _ = http
        .post(format!("{base}/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await;
    outcome
}
