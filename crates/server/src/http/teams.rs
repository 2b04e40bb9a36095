//! `/api/teams`: teams, their members, single-use invites and usage aggregates (see
//! `crate::teams` for who may do what). Login only. A team the caller is not in answers
//! `404 not_found` on every route, like a missing one; a role that may not do something
//! gets `403 forbidden`.

use std::sync::Arc;

use apex_protocol::error::{ErrorBody, ErrorCode};
use apex_protocol::teams::{
    ChangeRole, CreateInvite, CreateTeam, Invite, JoinTeam, MemberUsage, Team, TeamMember,
    TeamUsage,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType, ValidationFailed,
};
use super::{ApiJson, ApiQuery};
use crate::clock::{ms_to_rfc3339, now_ms};
use crate::error::ApiError;
use crate::ids::UserId;
use crate::state::AppState;
use crate::store::TeamMembership;
use crate::teams::{invite_digest, new_invite, Role, INVITE_TTL_MS};
use crate::usage::{window_start_ms, DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};
use crate::user_store::UserStore;

fn team_view(m: &TeamMembership) -> Team {
    Team {
        id: m.team_id.clone(),
        name: m.name.clone(),
        role: m.role.clone(),
        members: m.members,
        created_at: ms_to_rfc3339(m.created_at_ms),
    }
}

/// The caller's membership of team `id` and their role; a team they are not in is not
/// found.
async fn membership(store: &UserStore, id: &str) -> Result<(TeamMembership, Role), ApiError> {
    let membership = store
        .team_membership(id)
        .await?
        .ok_or_else(|| ApiError::not_found("team"))?;
    let role = Role::parse(&membership.role).unwrap_or(Role::Member);
    Ok((membership, role))
}

fn forbidden(message: &str) -> ApiError {
    ApiError::coded(ErrorCode::Forbidden, message.to_string())
}

/// A member a route acts on: the caller's team `team_id` (with the caller's role), and
/// `member`'s record and role in it. Not the caller's team, or not a member: not found.
struct Target {
    team: TeamMembership,
    caller: Role,
    id: UserId,
    record: crate::store::TeamMemberRecord,
    role: Role,
}

async fn target(
    state: &AppState,
    store: &UserStore,
    team_id: &str,
    member: &str,
) -> Result<Target, ApiError> {
    let (team, caller) = membership(store, team_id).await?;
    let id = UserId::parse(member).map_err(|_| ApiError::not_found("member"))?;
    let record = state
        .infra
        .store
        .team_members(&team.team_id)
        .await?
        .into_iter()
        .find(|m| m.user_id == id.to_string())
        .ok_or_else(|| ApiError::not_found("member"))?;
    let role = Role::parse(&record.role).unwrap_or(Role::Member);
    Ok(Target {
        team,
        caller,
        id,
        record,
        role,
    })
}

/// Makes a team; the caller is its owner.
#[utoipa::path(
    post,
    path = "/api/teams",
    operation_id = "create_team",
    tag = "teams",
    security(("bearer_jwt" = [])),
    request_body = CreateTeam,
    responses(
        (status = 201, description = "The team", body = Team),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<CreateTeam>,
) -> Result<(StatusCode, Json<Team>), ApiError> {
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 || name.contains('\0') {
        return Err(ApiError::validation(
            "name must be 1 to 100 characters, no NUL",
        ));
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let id = format!("team_{}", uuid::Uuid::new_v4().simple());
    store.create_team(&id, name, now_ms()).await?;
    let (created, _) = membership(&store, &id).await?;
    Ok((StatusCode::CREATED, Json(team_view(&created))))
}

/// The teams the caller is in, with their role.
#[utoipa::path(
    get,
    path = "/api/teams",
    operation_id = "list_teams",
    tag = "teams",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's teams", body = Vec<Team>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Team>>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(store.teams().await?.iter().map(team_view).collect()))
}

/// An invite to the team, shown once (owners invite admins and members, admins members).
#[utoipa::path(
    post,
    path = "/api/teams/{team_id}/invites",
    operation_id = "invite_to_team",
    tag = "teams",
    security(("bearer_jwt" = [])),
    params(("team_id" = String, Path, description = "A team id")),
    request_body = CreateInvite,
    responses(
        (status = 201, description = "The invite, shown once", body = Invite),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 403, description = "The caller's role may not invite that role (code: `forbidden`), or an API key (`insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "Not a team of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn invite(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(team_id): Path<String>,
    ApiJson(body): ApiJson<CreateInvite>,
) -> Result<(StatusCode, Json<Invite>), ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let (team, role) = membership(&store, &team_id).await?;
    let invited = match body.role.as_deref().unwrap_or("member") {
        "member" => Role::Member,
        "admin" => Role::Admin,
        other => {
            return Err(ApiError::validation(format!(
                "role {other:?} is not one of member, admin"
            )))
        }
    };
    if !role.may_invite(invited) {
        return Err(forbidden(
            "admins invite members; only the owner invites admins",
        ));
    }
    let (token, digest) = new_invite();
    let now = now_ms();
    state
        .infra
        .store
        .create_team_invite(
            &team.team_id,
            &digest,
            invited.name(),
            user.user_id(),
            now,
            now + INVITE_TTL_MS,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(Invite {
            token,
            team_id: team.team_id,
            role: invited.name().into(),
            expires_at: ms_to_rfc3339(now + INVITE_TTL_MS),
        }),
    ))
}

/// Joins the team of an invite (once, before it expires).
#[utoipa::path(
    post,
    path = "/api/teams/join",
    operation_id = "join_team",
    tag = "teams",
    security(("bearer_jwt" = [])),
    request_body = JoinTeam,
    responses(
        (status = 200, description = "The team joined", body = Team),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such invite, or used, or expired (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn join(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<JoinTeam>,
) -> Result<Json<Team>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let team = store
        .redeem_team_invite(&invite_digest(&body.token), now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found("invite"))?;
    let (joined, _) = membership(&store, &team).await?;
    Ok(Json(team_view(&joined)))
}

/// The team's members (any member may see who is in the team).
#[utoipa::path(
    get,
    path = "/api/teams/{team_id}/members",
    operation_id = "team_members",
    tag = "teams",
    security(("bearer_jwt" = [])),
    params(("team_id" = String, Path, description = "A team id")),
    responses(
        (status = 200, description = "The members", body = Vec<TeamMember>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "Not a team of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn members(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(team_id): Path<String>,
) -> Result<Json<Vec<TeamMember>>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let (team, _) = membership(&store, &team_id).await?;
    let members = state.infra.store.team_members(&team.team_id).await?;
    Ok(Json(
        members
            .into_iter()
            .map(|m| TeamMember {
                user_id: m.user_id,
                email: m.email,
                name: m.name,
                role: m.role,
                joined_at: ms_to_rfc3339(m.joined_at_ms),
            })
            .collect(),
    ))
}

/// Removes a member (owners remove admins and members, admins members); a member may
/// leave (`user_id` their own), except the owner.
#[utoipa::path(
    delete,
    path = "/api/teams/{team_id}/members/{user_id}",
    operation_id = "remove_team_member",
    tag = "teams",
    security(("bearer_jwt" = [])),
    params(
        ("team_id" = String, Path, description = "A team id"),
        ("user_id" = String, Path, description = "A member's user id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "The caller's role may not remove that member (code: `forbidden`), or an API key", body = ErrorBody),
        (status = 404, description = "Not a team of the caller's, or not a member (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((team_id, member)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let target = target(&state, &store, &team_id, &member).await?;
    if !target
        .caller
        .may_remove(target.role, target.id == user.user_id())
    {
        return Err(forbidden(
            "owners remove admins and members, admins remove members; the owner cannot leave",
        ));
    }
    state
        .infra
        .store
        .remove_team_member(&target.team.team_id, target.id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes a member's role between `admin` and `member` (the owner only; ownership does
/// not move).
#[utoipa::path(
    patch,
    path = "/api/teams/{team_id}/members/{user_id}",
    operation_id = "change_team_role",
    tag = "teams",
    security(("bearer_jwt" = [])),
    params(
        ("team_id" = String, Path, description = "A team id"),
        ("user_id" = String, Path, description = "A member's user id"),
    ),
    request_body = ChangeRole,
    responses(
        (status = 200, description = "The member with their new role", body = TeamMember),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Not the team's owner, or the owner's own role (code: `forbidden`), or an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "Not a team of the caller's, or not a member (code: `not_found`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn change_role(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((team_id, member)): Path<(String, String)>,
    ApiJson(body): ApiJson<ChangeRole>,
) -> Result<Json<TeamMember>, ApiError> {
    let to = match Role::parse(&body.role) {
        Some(role @ (Role::Admin | Role::Member)) => role,
        _ => return Err(ApiError::validation("role must be admin or member")),
    };
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let target = target(&state, &store, &team_id, &member).await?;
    if !target.caller.may_change_role(target.role, to) {
        return Err(forbidden(
            "only the team's owner changes roles, and the owner's own role does not change",
        ));
    }
    if !state
        .infra
        .store
        .set_team_role(&target.team.team_id, target.id, to.name())
        .await?
    {
        return Err(ApiError::not_found("member"));
    }
    let record = target.record;
    Ok(Json(TeamMember {
        user_id: record.user_id,
        email: record.email,
        name: record.name,
        role: to.name().into(),
        joined_at: ms_to_rfc3339(record.joined_at_ms),
    }))
}

/// `?days=N` of the team's usage.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TeamUsageQuery {
    /// The window in days, ending now: 1 to 365, default 30.
    pub days: Option<u32>,
}

/// The team's usage as totals per member (owners and admins): never messages or prompts.
#[utoipa::path(
    get,
    path = "/api/teams/{team_id}/usage",
    operation_id = "team_usage",
    tag = "teams",
    security(("bearer_jwt" = [])),
    params(("team_id" = String, Path, description = "A team id"), TeamUsageQuery),
    responses(
        (status = 200, description = "Totals per member", body = TeamUsage),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "A member who is not an admin (code: `forbidden`), or an API key", body = ErrorBody),
        (status = 404, description = "Not a team of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn usage(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(team_id): Path<String>,
    ApiQuery(query): ApiQuery<TeamUsageQuery>,
) -> Result<Json<TeamUsage>, ApiError> {
    let days = query.days.unwrap_or(DEFAULT_WINDOW_DAYS);
    if !(1..=MAX_WINDOW_DAYS).contains(&days) {
        return Err(ApiError::validation(format!(
            "days must be 1..={MAX_WINDOW_DAYS}"
        )));
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let (team, role) = membership(&store, &team_id).await?;
    if !role.manages() {
        return Err(forbidden("only the team's owner and admins see its usage"));
    }
    let now = now_ms();
    let totals = state
        .infra
        .store
        .team_usage(&team.team_id, window_start_ms(days, now), now)
        .await?;
    Ok(Json(TeamUsage {
        team_id: team.team_id,
        days,
        total_requests: totals.iter().map(|m| m.requests).sum(),
        total_cost_usd: totals.iter().fold(0.0, |sum, m| sum + m.cost_usd),
        members: totals
            .into_iter()
            .map(|m| MemberUsage {
                user_id: m.user_id,
                email: m.email,
                requests: m.requests,
                prompt_tokens: m.prompt_tokens,
                completion_tokens: m.completion_tokens,
                cost_usd: m.cost_usd,
            })
            .collect(),
    }))
}
