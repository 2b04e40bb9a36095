//! Every auth route: register, login, refresh rotation, logout revocation, me.

use apex_protocol::auth::TokenPair;
use apex_protocol::error::ErrorBody;
use serde_json::json;

use crate::helpers::{spawn_app, PASSWORD};

async fn error_code(response: reqwest::Response) -> String {
    response
        .json::<ErrorBody>()
        .await
        .expect("error body")
        .error
        .code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_returns_a_token_pair_that_works_for_me() {
    let app = spawn_app().await;
    let user = app.register().await;
    assert_eq!(user.tokens.token_type, "Bearer");
    assert!(user.tokens.expires_in > 0);
    assert_eq!(user.tokens.user.email, user.email);
    assert_eq!(user.tokens.user.name.as_deref(), Some("Test"));

    let me = app.get("/auth/me", user.token()).await;
    assert_eq!(me.status(), 200);
    let me: serde_json::Value = me.json().await.unwrap();
    assert_eq!(me["id"], user.id.as_str());
    assert_eq!(me["email"], user.email.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rejects_duplicates_and_invalid_input() {
    let app = spawn_app().await;
    let user = app.register().await;

    let again = app.register_raw(&user.email.to_uppercase(), PASSWORD).await;
    assert_eq!(again.status(), 409);
    assert_eq!(error_code(again).await, "email_taken");

    for (email, password) in [
        ("not-an-email", PASSWORD),
        ("ok@example.com", "short"),
        ("", PASSWORD),
    ] {
        let response = app.register_raw(email, password).await;
        assert_eq!(response.status(), 422, "{email:?}/{password:?}");
        assert_eq!(error_code(response).await, "validation_failed");
    }

    let missing_field = app
        .post_json("/auth/register", None, &json!({"email": "x@example.com"}))
        .await;
    assert_eq!(missing_field.status(), 422);
    assert_eq!(error_code(missing_field).await, "validation_failed");

    let malformed = app
        .http
        .post(app.url("/auth/register"))
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 400);
    assert_eq!(error_code(malformed).await, "invalid_json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_checks_the_password_and_hides_which_part_was_wrong() {
    let app = spawn_app().await;
    let user = app.register().await;

    let ok = app.login(&user.email, PASSWORD).await;
    assert_eq!(ok.status(), 200);
    let pair: TokenPair = ok.json().await.unwrap();
    assert_eq!(pair.user.id, user.id);

    let wrong = app.login(&user.email, "wrong password!").await;
    assert_eq!(wrong.status(), 401);
    let wrong_body: ErrorBody = wrong.json().await.unwrap();
    let unknown = app.login("nobody@example.com", PASSWORD).await;
    assert_eq!(unknown.status(), 401);
    let unknown_body: ErrorBody = unknown.json().await.unwrap();
    assert_eq!(
        wrong_body, unknown_body,
        "same answer for unknown account and wrong password"
    );
    assert_eq!(wrong_body.error.code, "invalid_credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_rotates_and_the_old_refresh_token_stops_working() {
    let app = spawn_app().await;
    let user = app.register().await;
    let old = user.tokens.refresh_token.clone();

    let first = app
        .post_json("/auth/refresh", None, &json!({"refresh_token": old}))
        .await;
    assert_eq!(first.status(), 200);
    let pair: TokenPair = first.json().await.unwrap();
    assert_ne!(pair.refresh_token, old);
    assert_eq!(app.get("/auth/me", &pair.access_token).await.status(), 200);

    let reused = app
        .post_json("/auth/refresh", None, &json!({"refresh_token": old}))
        .await;
    assert_eq!(reused.status(), 401);
    assert_eq!(error_code(reused).await, "invalid_token");

    // An access token is not a refresh token.
    let wrong_type = app
        .post_json(
            "/auth/refresh",
            None,
            &json!({"refresh_token": pair.access_token}),
        )
        .await;
    assert_eq!(wrong_type.status(), 401);
    // And a refresh token is not an access token.
    assert_eq!(app.get("/auth/me", &pair.refresh_token).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revokes_the_access_token_and_its_refresh_token() {
    let app = spawn_app().await;
    let user = app.register().await;
    let other_session: TokenPair = app.login(&user.email, PASSWORD).await.json().await.unwrap();

    let logout = app
        .post_json("/auth/logout", Some(user.token()), &json!({}))
        .await;
    assert_eq!(logout.status(), 204);

    let me = app.get("/auth/me", user.token()).await;
    assert_eq!(me.status(), 401);
    assert_eq!(error_code(me).await, "invalid_token");
    let refresh = app
        .post_json(
            "/auth/refresh",
            None,
            &json!({"refresh_token": user.tokens.refresh_token}),
        )
        .await;
    assert_eq!(refresh.status(), 401);

    // Logging out one session leaves the user's other sessions alone.
    assert_eq!(
        app.get("/auth/me", &other_session.access_token)
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_routes_need_a_valid_bearer_token() {
    let app = spawn_app().await;
    let none = app.http.get(app.url("/api/threads")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(error_code(none).await, "unauthorized");
    let garbage = app.get("/api/threads", "not.a.jwt").await;
    assert_eq!(garbage.status(), 401);
    assert_eq!(error_code(garbage).await, "invalid_token");
}
