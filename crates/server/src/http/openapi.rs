//! The OpenAPI 3.1 document: its frame (info, tags, security schemes, the shared error
//! responses) and `GET /openapi.json`.
//!
//! The operations themselves are not listed here: each handler carries its own
//! `#[utoipa::path]`, and [`super::routes`] registers handler and operation together with
//! `utoipa_axum::routes!`, so a route cannot be served without being documented (and the
//! `openapi` integration test checks the served router against the document both ways).
//! The error responses below are built from the codes in `apex_protocol::error::codes`,
//! so the document names exactly the codes the server sends; `docs/errors.md` explains
//! them.

use apex_protocol::error::{codes, ErrorBody, ErrorDetail};
use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Extension;
use serde_json::json;
use utoipa::openapi::example::ExampleBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, HeaderBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToResponse};

/// Name of the bearer-JWT security scheme (`Authorization: Bearer <access_token>`).
pub const BEARER: &str = "bearer_jwt";
/// Name of the WebSocket-ticket security scheme (`GET /ws?ticket=<ticket_id>`).
pub const WS_TICKET: &str = "ws_ticket";

/// The document's frame; [`super::routes`] adds every operation to it.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Apex",
        description = "A multi-user AI agent server. Register or log in to get a bearer \
            token, then use the REST API below or the WebSocket at `/ws` (frames: \
            docs/protocol.md). Every failed request answers the `ErrorBody` shape; the codes \
            are listed per response and explained in docs/errors.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&SecuritySchemes),
    components(
        schemas(ErrorBody, ErrorDetail),
        responses(
            InvalidJson,
            Unauthenticated,
            InvalidCredentials,
            NotFound,
            PayloadTooLarge,
            UnsupportedMediaType,
            ValidationFailed,
            RateLimited,
            ImportQuotaExceeded,
            Internal
        )
    ),
    tags(
        (name = "auth", description = "Accounts, tokens and WebSocket tickets"),
        (name = "threads", description = "A user's conversations and their messages"),
        (name = "runs", description = "Starting, inspecting, stopping and replaying agent runs"),
        (name = "keys", description = "API keys for programs: made, listed and revoked by a logged-in user; each acts as that user on the routes of its scopes"),
        (name = "teams", description = "Teams: members, single-use invites, roles (owner, admin, member); admins see usage as totals per member, never messages"),
        (name = "alerts", description = "Alert rules on the caller's (or their team's) usage and scheduled reports, evaluated on a schedule, each tick taken by one instance; what they raised; Standard Webhooks delivery with retries, a delivery log and redelivery"),
        (name = "budgets", description = "Spending caps on the caller's own LLM calls, held by reserving what each call can cost before it goes out (`budget_exceeded`, 402)"),
        (name = "usage", description = "A user's own AI usage data: upload, summary, daily series"),
        (name = "websocket", description = "The live channel; frames are described in docs/protocol.md"),
        (name = "compat", description = "Entry points kept for clients of the original system"),
        (name = "openai", description = "OpenAI-compatible API: point an OpenAI SDK at `/v1` with your access token as the API key"),
        (name = "health", description = "Liveness and readiness"),
        (name = "web", description = "The browser chat page and its assets"),
        (name = "meta", description = "This document, its reference page and the metrics")
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "The `access_token` from /auth/register, /auth/login or /auth/refresh; \
                         or an API key (`apx_…`, POST /api/keys) on the routes of its scopes \
                         (`chat`: threads, runs, /v1; `usage:read`; `usage:write`), elsewhere \
                         403 `insufficient_scope`.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            WS_TICKET,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "ticket",
                "A short-lived ticket from POST /api/websocket/ticket; keeps the JWT out of URLs.",
            ))),
        );
    }
}

/// A JSON error response listing the codes it may carry, one example each.
fn error_response(description: &str, error_codes: &[(&str, &str)]) -> Response {
    let examples = error_codes.iter().map(|(code, message)| {
        let example = ExampleBuilder::new()
            .value(Some(json!({"error": {"code": code, "message": message}})))
            .build();
        (*code, example)
    });
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("ErrorBody")))
        .examples_from_iter(examples);
    let codes: Vec<String> = error_codes.iter().map(|(c, _)| format!("`{c}`")).collect();
    ResponseBuilder::new()
        .description(format!("{description} (code: {}).", codes.join(" or ")))
        .content("application/json", content.build())
        .build()
}

/// Declares reusable error responses: `Name => "description", [(code, example message)]`.
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident => $description:literal, [$(($code:expr, $message:literal)),+ $(,)?];)+) => {
        $(
            $(#[$doc])*
            pub struct $name;

            impl<'s> ToResponse<'s> for $name {
                fn response() -> (&'s str, RefOr<Response>) {
                    (stringify!($name), error_response($description, &[$(($code, $message)),+]).into())
                }
            }
        )+
    };
}

error_responses! {
    /// 400.
    InvalidJson => "The body is not valid JSON", [(codes::INVALID_JSON, "body is not valid JSON: ...")];
    /// 401 on a route that needs a bearer token.
    Unauthenticated => "No bearer token, or an invalid, expired or revoked one",
        [(codes::UNAUTHORIZED, "missing bearer token"), (codes::INVALID_TOKEN, "access token is invalid, expired or revoked")];
    /// 401 on login.
    InvalidCredentials => "Unknown email or wrong password (the same answer for both)",
        [(codes::INVALID_CREDENTIALS, "invalid email or password")];
    /// 404 for a missing, malformed or other user's id (indistinguishable on purpose).
    NotFound => "Not found, or not yours", [(codes::NOT_FOUND, "thread not found")];
    /// 413.
    PayloadTooLarge => "The body is over the limit (2 MiB; 32 MiB for usage uploads)",
        [(codes::PAYLOAD_TOO_LARGE, "request body is too large")];
    /// 415.
    UnsupportedMediaType => "Wrong Content-Type", [(codes::UNSUPPORTED_MEDIA_TYPE, "expected Content-Type: application/json")];
    /// 422.
    ValidationFailed => "A well-formed request that breaks a rule; the message says which",
        [(codes::VALIDATION_FAILED, "message must not be empty")];
    /// 409 on a usage upload.
    ImportQuotaExceeded => "The upload would leave the user with more stored usage rows than \
        the quota (import_row_quota); nothing was stored",
        [(codes::IMPORT_QUOTA_EXCEEDED, "this upload of 50000 rows would exceed your quota of 1000000 stored usage rows (990000 stored); nothing was imported")];
    /// 500.
    Internal => "A server-side failure; details are in the server log only", [(codes::INTERNAL, "internal server error")];
}

/// 429 with a `Retry-After` header (not expressible with the macro above).
pub struct RateLimited;

impl<'s> ToResponse<'s> for RateLimited {
    fn response() -> (&'s str, RefOr<Response>) {
        let mut response = error_response(
            "Too many requests for this user or address; wait for `Retry-After` seconds",
            &[
                (codes::RATE_LIMITED, "too many messages; slow down"),
                (
                    codes::TOO_MANY_RUNS,
                    "at most 3 runs at once; wait for one to finish",
                ),
            ],
        );
        response.headers.insert(
            "Retry-After".to_string(),
            HeaderBuilder::new()
                .schema(<u64 as utoipa::PartialSchema>::schema())
                .description(Some("Seconds to wait (with `rate_limited`)."))
                .build(),
        );
        ("RateLimited", response.into())
    }
}

/// The serialised document, computed once when the router is built and handed to
/// [`document`] as a request extension (no global state).
#[derive(Clone)]
pub struct OpenApiJson(pub Bytes);

impl OpenApiJson {
    pub fn new(document: &utoipa::openapi::OpenApi) -> Self {
        // Serialising plain data structures cannot fail.
        let json = document
            .to_pretty_json()
            .expect("the OpenAPI document serialises to JSON");
        OpenApiJson(Bytes::from(json))
    }
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi_document",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this server", content_type = "application/json", body = Object),
    )
)]
pub async fn document(Extension(json): Extension<OpenApiJson>) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        json.0,
    )
}
