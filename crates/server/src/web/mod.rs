//! The browser pages: the chat page at `GET /`, the API reference at `GET /docs`, and
//! their assets under `/assets/`, all compiled into the binary.
//!
//! Plain HTML, CSS and ES modules committed as source in `web/assets/` (no build step, no
//! CDN, no third-party code), embedded with `include_bytes!`. The page talks to the same
//! public API as any client (docs/protocol.md): REST with a bearer token kept in
//! `sessionStorage`, and the WebSocket opened with a ticket so the JWT never appears in a
//! URL. It renders every server string as text (DOM `textContent`, never HTML parsing),
//! and the strict `Content-Security-Policy` sent with it allows only its own scripts,
//! styles and connections.
//!
//! The reference page (`docs.html`, `docs.js`, `docs.css`) renders `/openapi.json` the same
//! way: operations by tag, their parameters, bodies and responses, the schemas, and a "try
//! it" form that sends requests with a bearer token. It works offline: nothing is fetched
//! from anywhere but this server.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use apex_protocol::error::ErrorBody;

use crate::error::ApiError;
use crate::state::AppState;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";

/// The page itself.
const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("assets/index.html"),
};

/// The API reference page.
const DOCS: Asset = Asset {
    name: "docs.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("assets/docs.html"),
};

/// Everything under `/assets/`, by file name.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/app.css"),
    },
    Asset {
        name: "icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("assets/icon.svg"),
    },
    Asset {
        name: "main.js",
        content_type: JS,
        body: include_bytes!("assets/main.js"),
    },
    Asset {
        name: "api.js",
        content_type: JS,
        body: include_bytes!("assets/api.js"),
    },
    Asset {
        name: "socket.js",
        content_type: JS,
        body: include_bytes!("assets/socket.js"),
    },
    Asset {
        name: "run.js",
        content_type: JS,
        body: include_bytes!("assets/run.js"),
    },
    Asset {
        name: "usage.js",
        content_type: JS,
        body: include_bytes!("assets/usage.js"),
    },
    Asset {
        name: "budgets.js",
        content_type: JS,
        body: include_bytes!("assets/budgets.js"),
    },
    Asset {
        name: "alerts.js",
        content_type: JS,
        body: include_bytes!("assets/alerts.js"),
    },
    Asset {
        name: "dom.js",
        content_type: JS,
        body: include_bytes!("assets/dom.js"),
    },
    Asset {
        name: "docs.js",
        content_type: JS,
        body: include_bytes!("assets/docs.js"),
    },
    Asset {
        name: "docs.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("assets/docs.css"),
    },
];

/// Only the page's own files and connections (`'self'` covers its WebSocket in current
/// browsers); no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

/// `GET /`, `GET /docs` and `GET /assets/{name}`.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(index))
        .routes(routes!(docs))
        .routes(routes!(asset))
}

/// The chat page.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "chat_page",
    tag = "web",
    params(("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer")),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 304, description = "Not modified"),
    )
)]
async fn index(headers: HeaderMap) -> Response {
    respond(&INDEX, &headers)
}

/// This API reference, rendered from `/openapi.json` in the browser.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs_page",
    tag = "meta",
    params(("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer")),
    responses(
        (status = 200, description = "The page", content_type = "text/html", body = String),
        (status = 304, description = "Not modified"),
    )
)]
async fn docs(headers: HeaderMap) -> Response {
    respond(&DOCS, &headers)
}

/// A script, style sheet or icon of the pages.
#[utoipa::path(
    get,
    path = "/assets/{name}",
    operation_id = "asset",
    tag = "web",
    params(
        ("name" = String, Path, description = "File name", example = "main.js"),
        ("If-None-Match" = Option<String>, Header, description = "An ETag from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The file (JavaScript, CSS or SVG)", content_type = "text/javascript", body = String),
        (status = 304, description = "Not modified"),
        (status = 404, description = "No such asset (code: `not_found`)", body = ErrorBody),
    )
)]
async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(found) => respond(found, &headers),
        None => ApiError::not_found("route").into_response(),
    }
}

/// The asset with a content-hash `ETag`; `304` when the browser already has it.
fn respond(asset: &Asset, request: &HeaderMap) -> Response {
    let digest = Sha256::digest(asset.body);
    let etag: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    let etag = format!("\"{etag}\"");
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    let status = if fresh {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body: &'static [u8] = if fresh { b"" } else { asset.body };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(asset: &Asset) -> &'static str {
        std::str::from_utf8(asset.body).expect("assets are UTF-8")
    }

    fn all() -> impl Iterator<Item = &'static Asset> {
        [&INDEX, &DOCS].into_iter().chain(ASSETS.iter())
    }

    /// Every `/assets/x` the page or a module refers to, and every `./x.js` import, is
    /// embedded; every embedded asset is used.
    #[test]
    fn references_and_embedded_assets_match() {
        let mut referenced = Vec::new();
        for asset in all() {
            let source = text(asset);
            for marker in ["/assets/", "from './"] {
                for piece in source.split(marker).skip(1) {
                    let name: String = piece
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                        .collect();
                    referenced.push(name);
                }
            }
        }
        for name in &referenced {
            assert!(
                ASSETS.iter().any(|a| a.name == name),
                "{name} is referenced but not embedded"
            );
        }
        for asset in ASSETS {
            assert!(
                referenced.iter().any(|n| n == asset.name),
                "{} is embedded but never referenced",
                asset.name
            );
        }
    }

    /// Server strings are rendered as text: no HTML-parsing sinks, no eval, no external
    /// URLs (the only absolute URL is the SVG namespace).
    #[test]
    fn assets_use_no_html_sinks_and_no_external_urls() {
        for asset in all() {
            let source = text(asset);
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "srcdoc",
            ] {
                assert!(!source.contains(sink), "{} uses {sink}", asset.name);
            }
            let urls = source.matches("http://").count() + source.matches("https://").count();
            let namespace = source.matches("http://www.w3.org/2000/svg").count();
            assert_eq!(urls, namespace, "{} refers to an external URL", asset.name);
            assert!(
                !source.contains("style=\""),
                "{} has an inline style",
                asset.name
            );
        }
        assert!(!text(&INDEX).contains("<script>"), "no inline script");
        assert!(!text(&DOCS).contains("<script>"), "no inline script");
    }

    #[test]
    fn etag_answers_not_modified() {
        let first = respond(&INDEX, &HeaderMap::new());
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        let mut request = HeaderMap::new();
        request.insert(header::IF_NONE_MATCH, etag);
        assert_eq!(respond(&INDEX, &request).status(), StatusCode::NOT_MODIFIED);
    }
}
