//! Teams: made, joined with single-use invites, roles that decide who may do what (a table
//! of role × route × whose team, checked in full), usage seen by admins as totals per
//! member only, and team budgets that hold every member's calls.

use apex_protocol::teams::{Invite, Team, TeamMember, TeamUsage};
use serde_json::{json, Value};

use crate::budgets::{app_with_upstream, call, key};
use crate::helpers::{spawn_app, TestApp, TestUser};

async fn create_team(app: &TestApp, user: &TestUser, name: &str) -> Team {
    let response = app
        .post_json("/api/teams", Some(user.token()), &json!({"name": name}))
        .await;
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn invite(app: &TestApp, user: &TestUser, team: &str, role: &str) -> (u16, Value) {
    let response = app
        .post_json(
            &format!("/api/teams/{team}/invites"),
            Some(user.token()),
            &json!({"role": role}),
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn join(app: &TestApp, user: &TestUser, token: &str) -> u16 {
    app.post_json(
        "/api/teams/join",
        Some(user.token()),
        &json!({"token": token}),
    )
    .await
    .status()
    .as_u16()
}

/// A team with an owner, an admin and a member, and a stranger in another team.
struct Cast {
    team: String,
    owner: TestUser,
    admin: TestUser,
    member: TestUser,
    stranger: TestUser,
    other_team: String,
}

async fn cast(app: &TestApp) -> Cast {
    let (owner, admin, member, stranger) = (
        app.register().await,
        app.register().await,
        app.register().await,
        app.register().await,
    );
    let team = create_team(app, &owner, "Platform").await;
    assert_eq!((team.role.as_str(), team.members), ("owner", 1));
    for (user, role) in [(&admin, "admin"), (&member, "member")] {
        let (status, body) = invite(app, &owner, &team.id, role).await;
        assert_eq!(status, 201, "{body}");
        let invite: Invite = serde_json::from_value(body).unwrap();
        assert_eq!(join(app, user, &invite.token).await, 200);
    }
    let other_team = create_team(app, &stranger, "Elsewhere").await.id;
    Cast {
        team: team.id,
        owner,
        admin,
        member,
        stranger,
        other_team,
    }
}

#[tokio::test]
async fn invites_are_single_use_and_members_see_who_is_in_the_team() {
    let mut app = spawn_app().await;
    let c = cast(&app).await;
    let members: Vec<TeamMember> = app
        .get(&format!("/api/teams/{}/members", c.team), c.member.token())
        .await
        .json()
        .await
        .unwrap();
    let roles: Vec<(&str, &str)> = members
        .iter()
        .map(|m| (m.email.as_str(), m.role.as_str()))
        .collect();
    assert_eq!(
        roles,
        vec![
            (c.owner.email.as_str(), "owner"),
            (c.admin.email.as_str(), "admin"),
            (c.member.email.as_str(), "member")
        ]
    );
    // An invite works once.
    let (_, body) = invite(&app, &c.admin, &c.team, "member").await;
    let token = body["token"].as_str().unwrap().to_string();
    let newcomer = app.register().await;
    assert_eq!(join(&app, &newcomer, &token).await, 200);
    assert_eq!(join(&app, &c.stranger, &token).await, 404);
    assert_eq!(join(&app, &c.stranger, "apt_not-a-token").await, 404);
    let teams: Vec<Team> = app
        .get("/api/teams", newcomer.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!((teams.len(), teams[0].members), (1, 4));
    // A member leaves; the owner cannot.
    let leave = |user: &TestUser| format!("/api/teams/{}/members/{}", c.team, user.id);
    let response = app
        .http
        .delete(app.url(&leave(&newcomer)))
        .bearer_auth(newcomer.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let response = app
        .http
        .delete(app.url(&leave(&c.owner)))
        .bearer_auth(c.owner.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    app.shutdown().await;
}

/// Role × route × whose team → status, checked in full: any drift fails.
#[tokio::test]
async fn the_authorization_table_holds_for_every_team_route() {
    let mut app = spawn_app().await;
    let c = cast(&app).await;
    #[derive(Clone, Copy, Debug)]
    enum Who {
        Owner,
        Admin,
        Member,
        Stranger,
    }
    let user = |who: Who| match who {
        Who::Owner => &c.owner,
        Who::Admin => &c.admin,
        Who::Member => &c.member,
        Who::Stranger => &c.stranger,
    };
    use Who::*;
    // (route, method, body, [owner, admin, member, stranger] on the cast's team)
    let members = format!("/api/teams/{}/members", c.team);
    let usage = format!("/api/teams/{}/usage", c.team);
    let invites = format!("/api/teams/{}/invites", c.team);
    let table: Vec<(&str, &str, Value, [u16; 4])> = vec![
        ("GET", &members, Value::Null, [200, 200, 200, 404]),
        ("GET", &usage, Value::Null, [200, 200, 403, 404]),
        (
            "POST",
            &invites,
            json!({"role": "member"}),
            [201, 201, 403, 404],
        ),
        (
            "POST",
            &invites,
            json!({"role": "admin"}),
            [201, 403, 403, 404],
        ),
        (
            "POST",
            &invites,
            json!({"role": "owner"}),
            [422, 422, 422, 404],
        ),
        (
            "POST",
            "/api/budgets",
            json!({"scope": "team", "scope_id": c.team, "limit_usd": 10, "period": "month"}),
            [201, 201, 403, 404],
        ),
    ];
    for (method, path, body, expected) in &table {
        for (i, who) in [Owner, Admin, Member, Stranger].into_iter().enumerate() {
            let request = match *method {
                "GET" => app.http.get(app.url(path)),
                _ => app.http.post(app.url(path)).json(body),
            };
            let status = request
                .bearer_auth(user(who).token())
                .send()
                .await
                .unwrap()
                .status();
            assert_eq!(
                status.as_u16(),
                expected[i],
                "{who:?} {method} {path} {body}"
            );
        }
    }
    // Removing: who may remove whom (a fresh member each time, the cast otherwise kept).
    for (remover, target_role, expected) in [
        (Owner, "admin", 204),
        (Owner, "member", 204),
        (Admin, "member", 204),
        (Admin, "admin", 403),
        (Member, "member", 403),
        (Stranger, "member", 404),
    ] {
        let target = app.register().await;
        let (_, body) = invite(&app, &c.owner, &c.team, target_role).await;
        assert_eq!(
            join(&app, &target, body["token"].as_str().unwrap()).await,
            200
        );
        let path = format!("/api/teams/{}/members/{}", c.team, target.id);
        let status = app
            .http
            .delete(app.url(&path))
            .bearer_auth(user(remover).token())
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status.as_u16(),
            expected,
            "{remover:?} removing a {target_role}"
        );
    }
    // A team id that does not exist answers like another user's.
    let ghost = "/api/teams/team_00000000000000000000000000000000/members";
    assert_eq!(app.get(ghost, c.owner.token()).await.status(), 404);
    assert_eq!(
        app.get(
            &format!("/api/teams/{}/members", c.other_team),
            c.owner.token()
        )
        .await
        .status(),
        404
    );
    // API keys manage no team.
    let (secret, _) = {
        let response = app
            .post_json(
                "/api/keys",
                Some(c.owner.token()),
                &json!({"name": "k", "scopes": ["usage:read"]}),
            )
            .await;
        let body: Value = response.json().await.unwrap();
        (body["key"].as_str().unwrap().to_string(), ())
    };
    assert_eq!(app.get("/api/teams", &secret).await.status(), 403);
    app.shutdown().await;
}

#[tokio::test]
async fn admins_see_usage_as_totals_per_member_and_a_team_budget_holds_every_member() {
    let mut app = app_with_upstream().await;
    let c = cast(&app).await;
    let usage: TeamUsage = app
        .get(
            &format!("/api/teams/{}/usage?days=30", c.team),
            c.admin.token(),
        )
        .await
        .json()
        .await
        .unwrap();
    // Totals only: each member's demo data, nothing of their conversations.
    assert_eq!(usage.members.len(), 3);
    for member in [&c.owner, &c.admin, &c.member] {
        let own = app.usage_summary(member).await;
        let row = usage
            .members
            .iter()
            .find(|m| m.email == member.email)
            .unwrap();
        assert_eq!(row.requests, own.total_requests as i64);
        assert!((row.cost_usd - own.total_cost_usd).abs() < 1e-6);
    }
    let text = serde_json::to_string(&usage).unwrap();
    assert!(
        !text.contains("content") && !text.contains("message"),
        "{text}"
    );
    // A team budget of 2 calls' tokens (30 each) holds the members together.
    let response = app
        .post_json(
            "/api/budgets",
            Some(c.admin.token()),
            &json!({"scope": "team", "scope_id": c.team, "limit_tokens": 60, "period": "day"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let (member_key, _) = key(&app, &c.member).await;
    let (owner_key, _) = key(&app, &c.owner).await;
    let (stranger_key, _) = key(&app, &c.stranger).await;
    assert_eq!(call(&app, &member_key, "gpt-4o-mini").await.0, 200);
    assert_eq!(call(&app, &owner_key, "gpt-4o-mini").await.0, 200);
    let (status, body) = call(&app, &member_key, "gpt-4o-mini").await;
    assert_eq!(status, 402);
    assert_eq!(body["error"]["details"]["scope"], "team");
    assert_eq!(body["error"]["details"]["scope_id"], c.team.as_str());
    // Someone outside the team is not held by it.
    assert_eq!(call(&app, &stranger_key, "gpt-4o-mini").await.0, 200);
    // The member sees the cap that holds them; only whoever set it may change it.
    let listed: Vec<Value> = app
        .get("/api/budgets", c.member.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["scope"], "team");
    let id = listed[0]["id"].as_str().unwrap();
    let response = app
        .http
        .delete(app.url(&format!("/api/budgets/{id}")))
        .bearer_auth(c.member.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // A member may still cap themself below it.
    let response = app
        .post_json(
            "/api/budgets",
            Some(c.member.token()),
            &json!({"scope": "user", "limit_tokens": 10, "period": "day"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    app.shutdown().await;
}

#[tokio::test]
async fn only_the_owner_changes_roles_and_ownership_never_moves() {
    let mut app = spawn_app().await;
    let c = cast(&app).await;
    let patch = |caller: &TestUser, target: &TestUser, role: &str| {
        let url = app.url(&format!("/api/teams/{}/members/{}", c.team, target.id));
        let request = app
            .http
            .patch(url)
            .bearer_auth(caller.token())
            .json(&json!({ "role": role }));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    // The owner makes the member an admin: they may now invite members.
    let (status, body) = patch(&c.owner, &c.member, "admin").await;
    assert_eq!(
        (status, body["role"].as_str()),
        (200, Some("admin")),
        "{body}"
    );
    assert_eq!(invite(&app, &c.member, &c.team, "member").await.0, 201);
    // An admin changes no one's role; nobody changes the owner's, or makes an owner.
    assert_eq!(patch(&c.admin, &c.member, "member").await.0, 403);
    assert_eq!(patch(&c.owner, &c.owner, "admin").await.0, 403);
    assert_eq!(patch(&c.owner, &c.admin, "owner").await.0, 422);
    assert_eq!(patch(&c.owner, &c.admin, "boss").await.0, 422);
    // A stranger's view: no such team; a non-member: no such member.
    assert_eq!(patch(&c.stranger, &c.member, "member").await.0, 404);
    assert_eq!(patch(&c.owner, &c.stranger, "member").await.0, 404);
    // Back to member: invites are the owner's and admins' again.
    let (status, _) = patch(&c.owner, &c.member, "member").await;
    assert_eq!(status, 200);
    assert_eq!(invite(&app, &c.member, &c.team, "member").await.0, 403);
    let members: Vec<TeamMember> = app
        .get(&format!("/api/teams/{}/members", c.team), c.owner.token())
        .await
        .json()
        .await
        .unwrap();
    let roles: Vec<_> = members.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["owner", "admin", "member"]);
    let _ = c.other_team;
    app.shutdown().await;
}
