//! Teams: `/api/teams` and its members, invites and usage aggregates.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A team as one of its members sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Team {
    pub id: String,
    pub name: String,
    /// The caller's role: `owner`, `admin` or `member`.
    pub role: String,
    pub members: i64,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CreateTeam {
    /// 1 to 100 characters.
    pub name: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CreateInvite {
    /// `member` (default) or `admin`; only the owner invites admins.
    #[serde(default)]
    pub role: Option<String>,
}

/// An invite, shown once: whoever presents `token` to `POST /api/teams/join` (once,
/// before `expires_at`) joins the team with `role`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Invite {
    pub token: String,
    pub team_id: String,
    pub role: String,
    pub expires_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct JoinTeam {
    pub token: String,
}

/// A member's new role: `admin` or `member` (the owner's role does not change).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ChangeRole {
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TeamMember {
    pub user_id: String,
    pub email: String,
    pub name: Option<String>,
    pub role: String,
    pub joined_at: String,
}

/// One member's usage totals: aggregates, never messages or prompts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct MemberUsage {
    pub user_id: String,
    pub email: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

/// `GET /api/teams/{id}/usage` (owners and admins).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct TeamUsage {
    pub team_id: String,
    pub days: u32,
    pub total_requests: i64,
    pub total_cost_usd: f64,
    pub members: Vec<MemberUsage>,
}
