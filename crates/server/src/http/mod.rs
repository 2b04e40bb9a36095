//! The HTTP API: [`routes`] (every route with its OpenAPI operation), `app(state) ->
//! Router`, and the extractors the handlers share.
//!
//! One file per resource; [`openapi`] holds the document's frame and `/openapi.json`. Handlers take [`AuthUser`](extract::AuthUser) for anything
//! user-scoped and reach data only through a `UserStore` built from it.

mod alerts;
mod auth;
mod budgets;
mod compat;
pub mod extract;
mod gateway;
pub mod health;
mod keys;
mod openai_compat;
pub mod openapi;
mod otlp;
mod prices;
mod run_stream;
pub(crate) mod runs;
mod teams;
pub(crate) mod threads;
mod usage;

use apex_protocol::error::codes;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Router;
use serde::de::DeserializeOwned;
use tower_http::trace::TraceLayer;
use utoipa::OpenApi as _;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt as _};
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{telemetry, web, ws};

/// Every route the server answers, each registered together with its OpenAPI operation
/// (`routes!` takes the path and methods from the handler's `#[utoipa::path]`): the one
/// route list. One `routes!` per path.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(auth::register))
        .routes(routes!(auth::login))
        .routes(routes!(auth::refresh))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::logout_all))
        .routes(routes!(auth::sessions))
        .routes(routes!(auth::revoke_session))
        .routes(routes!(auth::me))
        .routes(routes!(auth::ticket))
        .routes(routes!(compat::validate_token))
        .routes(routes!(compat::auth_config))
        .routes(routes!(compat::dev_login))
        .routes(routes!(compat::agent_v2_execute))
        .routes(routes!(compat::beacon))
        .routes(routes!(threads::list, threads::create))
        .routes(routes!(
            threads::get_one,
            threads::update,
            threads::put,
            threads::delete
        ))
        .routes(routes!(threads::messages))
        .routes(routes!(runs::start))
        .routes(routes!(runs::regenerate))
        .routes(routes!(runs::get_one))
        .routes(routes!(runs::cancel))
        .routes(routes!(runs::approval))
        .routes(routes!(keys::create, keys::list))
        .routes(routes!(keys::revoke))
        .routes(routes!(budgets::create, budgets::list))
        .routes(routes!(budgets::get_one, budgets::update, budgets::delete))
        .routes(routes!(teams::create, teams::list))
        .routes(routes!(teams::join))
        .routes(routes!(teams::invite))
        .routes(routes!(teams::members))
        .routes(routes!(teams::remove, teams::change_role))
        .routes(routes!(teams::usage))
        .routes(routes!(alerts::create_rule, alerts::list_rules))
        .routes(routes!(alerts::delete_rule))
        .routes(routes!(alerts::list_alerts))
        .routes(routes!(alerts::create_webhook, alerts::list_webhooks))
        .routes(routes!(alerts::delete_webhook))
        .routes(routes!(alerts::list_deliveries))
        .routes(routes!(alerts::redeliver))
        .routes(routes!(alerts::test_webhook))
        .routes(routes!(auth::settings, auth::update_settings))
        .routes(routes!(runs::events))
        .routes(
            routes!(usage::import).layer(axum::extract::DefaultBodyLimit::max(
                MAX_UPLOAD_BYTES as usize,
            )),
        )
        .routes(
            routes!(otlp::traces).layer(axum::extract::DefaultBodyLimit::max(
                MAX_UPLOAD_BYTES as usize,
            )),
        )
        .routes(routes!(usage::summary))
        .routes(routes!(usage::daily))
        .routes(routes!(prices::rows))
        .routes(routes!(prices::explain))
        .routes(routes!(prices::list, prices::import))
        .routes(routes!(openai_compat::models))
        .routes(routes!(openai_compat::chat_completions))
        .routes(routes!(gateway::embeddings))
        .routes(routes!(ws::upgrade))
        .merge(web::routes())
        .routes(routes!(health::metrics))
        .routes(routes!(openapi::document))
}

/// The OpenAPI 3.1 document of [`routes`], as served at `/openapi.json`.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes().into_openapi()
}

pub fn app(state: AppState) -> Router {
    let (router, document) = routes().split_for_parts();
    router
        .route_layer(axum::middleware::from_fn(telemetry::track_http))
        .layer(axum::middleware::from_fn(refuse_announced_oversize))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::client(
                StatusCode::METHOD_NOT_ALLOWED,
                codes::METHOD_NOT_ALLOWED,
                "method not allowed on this route",
            )
        })
        .layer(axum::Extension(openapi::OpenApiJson::new(&document)))
        .layer(cors_layer(&state.settings.cors_allowed_origins))
        .layer(
            // Spans carry the path only: a query string may hold a ticket. The request id
            // ties a request's log lines together.
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let request_id = uuid::Uuid::new_v4().simple().to_string();
                tracing::info_span!("http", method = %req.method(), path = %req.uri().path(), %request_id)
            }),
        )
        .with_state(state)
}

/// CORS for the configured frontend origins only (none by default). Credentials are
/// allowed, so origins are listed exactly: a wildcard would not work with credentials.
fn cors_layer(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allowed: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_credentials(true)
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .max_age(std::time::Duration::from_secs(600))
}

/// Largest request body on most routes; usage uploads get [`MAX_UPLOAD_BYTES`].
pub const MAX_BODY_BYTES: u64 = 2 * 1024 * 1024;
pub const MAX_UPLOAD_BYTES: u64 = 32 * 1024 * 1024;

/// A request that announces a body over the limit is answered 413 at once, before any of
/// it is read (the extractors still enforce the limit on bodies without a length).
async fn refuse_announced_oversize(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let limit = if matches!(
        request.uri().path(),
        "/api/usage/events" | "/otlp/v1/traces"
    ) {
        MAX_UPLOAD_BYTES
    } else {
        MAX_BODY_BYTES
    };
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit) {
        return ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("request body is larger than {limit} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// `Json<T>` whose rejections use the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::client(
                StatusCode::BAD_REQUEST,
                codes::INVALID_JSON,
                format!("body is not valid JSON: {}", e.body_text()),
            )),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::client(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                codes::UNSUPPORTED_MEDIA_TYPE,
                "expected Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(_)) => Err(ApiError::client(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::PAYLOAD_TOO_LARGE,
                "request body is too large",
            )),
            Err(e) => Err(ApiError::validation(e.body_text())),
        }
    }
}

/// `Query<T>` whose rejections use the API's error shape.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError::validation(e.body_text()))
    }
}

/// The client's IP address, when the server was started with connection info (as
/// `serve` does); `None` when the router is driven without it.
pub struct ClientAddress(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|info| info.0.ip()),
        ))
    }
}

/// The request's `User-Agent`, if any: what a client says it is, shown in its session.
pub struct ClientLabel(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientLabel {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientLabel(
            parts
                .headers
                .get(axum::http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        ))
    }
}

/// `?limit&offset` with defaults and bounds.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// How many to return: 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// How many to skip: 0 or more, default 0.
    #[param(minimum = 0)]
    pub offset: Option<i64>,
}

impl Page {
    pub const DEFAULT_LIMIT: i64 = 50;
    pub const MAX_LIMIT: i64 = 500;

    pub fn bounds(&self) -> Result<(i64, i64), ApiError> {
        let limit = self.limit.unwrap_or(Self::DEFAULT_LIMIT);
        let offset = self.offset.unwrap_or(0);
        if !(1..=Self::MAX_LIMIT).contains(&limit) || offset < 0 {
            return Err(ApiError::validation(format!(
                "limit must be 1..={} and offset >= 0",
                Self::MAX_LIMIT
            )));
        }
        Ok((limit, offset))
    }
}

/// How long a reader may follow one run's events: the longest run, plus a minute for its
/// last events to arrive.
fn follow_limit(state: &AppState) -> std::time::Duration {
    state.settings.run_timeout + std::time::Duration::from_secs(60)
}
