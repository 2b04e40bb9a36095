//! The OpenAPI document at `/openapi.json` and the reference page at `/docs`.
//!
//! The document is checked against the server itself, not against a list kept beside it:
//! - the (path, method) pairs in axum's route table equal the documented ones, both ways;
//! - every documented operation, sent with a token and dummy input, is routed (no
//!   route-not-found 404, no 405) and answers a status the document lists for it;
//! - every other method on a documented path answers 405;
//! - an operation documents the bearer scheme exactly when it answers 401 without a token;
//! - Python's `openapi-spec-validator` accepts the document (that test needs the module;
//!   `scripts/test.sh` skips it when the module is not installed, except under `CI`).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with, TestApp};

/// The methods the API uses; HEAD (answered for every GET) and OPTIONS (CORS) are axum's.
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A path parameter value that names nothing, for routes without an example.
const UNKNOWN_ID: &str = "00000000-0000-4000-8000-000000000000";

async fn document(app: &TestApp) -> Value {
    let response = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("the document is JSON")
}

/// One documented operation.
struct Operation {
    path: String,
    method: String,
    op: Value,
}

impl Operation {
    fn name(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn statuses(&self) -> BTreeSet<String> {
        self.op["responses"]
            .as_object()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The bearer token is required: the scheme is listed and no alternative is empty.
    fn requires_token(&self) -> bool {
        let Some(requirements) = self.op["security"].as_array() else {
            return false;
        };
        !requirements.is_empty()
            && requirements
                .iter()
                .all(|r| r.as_object().is_some_and(|o| !o.is_empty()))
            && requirements.iter().any(|r| r.get("bearer_jwt").is_some())
    }

    fn is_websocket(&self) -> bool {
        self.statuses().contains("101")
    }

    /// The path with each parameter replaced by its example, or by an id that names nothing.
    fn url_path(&self) -> String {
        let mut path = self.path.clone();
        for param in self.op["parameters"].as_array().into_iter().flatten() {
            if param["in"] != "path" {
                continue;
            }
            let name = param["name"].as_str().expect("parameter name");
            let value = param["example"]
                .as_str()
                .or_else(|| param["schema"]["example"].as_str())
                .unwrap_or(UNKNOWN_ID);
            path = path.replace(&format!("{{{name}}}"), value);
        }
        assert!(
            !path.contains('{'),
            "{}: undocumented path parameter",
            self.name()
        );
        path
    }
}

fn operations(document: &Value) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            ops.push(Operation {
                path: path.clone(),
                method: method.to_ascii_uppercase(),
                op: op.clone(),
            });
        }
    }
    ops
}

fn documented_pairs(document: &Value) -> BTreeSet<(String, String)> {
    operations(document)
        .into_iter()
        .map(|o| (o.path, o.method))
        .collect()
}

fn unreadable<T>(text: &str) -> T {
    panic!("could not read the route table from axum's Debug output (did axum change it?):\n{text}")
}

/// The (path, method) pairs of axum's route table, read from the router's `Debug` output
/// (axum prints each route's `MethodRouter` under its `RouteId`, and the path of each
/// `RouteId`). HEAD is left out where GET is there (axum adds it to every GET).
fn served_pairs(router: &axum::Router) -> BTreeSet<(String, String)> {
    let text = format!("{router:?}");
    // Only the main path router; the fallback router comes after it.
    let main = text
        .split(", fallback_router:")
        .next()
        .unwrap_or_else(|| unreadable(&text));
    let (routes, paths) = main
        .split_once("node: Node { paths: {")
        .unwrap_or_else(|| unreadable(&text));

    let mut path_of = std::collections::HashMap::new();
    for entry in paths.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once(')').unwrap_or_else(|| unreadable(&text));
        let path = rest.split('"').nth(1).unwrap_or_else(|| unreadable(&text));
        path_of.insert(id.to_string(), path.to_string());
    }

    let mut pairs = BTreeSet::new();
    for entry in routes.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once(')').unwrap_or_else(|| unreadable(&text));
        let path = path_of.get(id).unwrap_or_else(|| unreadable(&text));
        let rest = rest.trim_start_matches(": ");
        let Some(fields) = rest.strip_prefix("MethodRouter(MethodRouter { ") else {
            // A service routed for every method (`route_service`, `nest_service`).
            pairs.insert((path.clone(), "ANY".to_string()));
            continue;
        };
        let fields = fields
            .split("fallback:")
            .next()
            .unwrap_or_else(|| unreadable(&text));
        let methods: Vec<String> = fields
            .split(", ")
            .filter_map(|field| field.split_once(": "))
            .filter(|(_, endpoint)| endpoint.trim() != "None")
            .map(|(method, _)| method.trim().to_ascii_uppercase())
            .collect();
        for method in &methods {
            if method == "HEAD" && methods.iter().any(|m| m == "GET") {
                continue;
            }
            pairs.insert((path.clone(), method.clone()));
        }
    }
    assert!(
        pairs.len() >= path_of.len() && !pairs.is_empty(),
        "read too little of the route table from axum's Debug output:\n{text}"
    );
    pairs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_exactly_the_routes_the_router_serves() {
    let app = spawn_app().await;
    let document = document(&app).await;
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "OpenAPI 3.1, got {}",
        document["openapi"]
    );
    // The router `serve` runs, built the same way.
    let router = apex_server::http::app(app.state.clone());
    let served = served_pairs(&router);
    let documented = documented_pairs(&document);

    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes served but not in /openapi.json (register them with routes! and a \
         #[utoipa::path]): {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "operations documented but not routed: {unserved:?}"
    );
    // The document served is the one the library builds.
    let built = serde_json::to_value(apex_server::http::openapi_document()).expect("json");
    assert_eq!(built, document);
}

/// Sends `op` with dummy input: `{}` as the body of a POST, PUT or PATCH.
async fn send(app: &TestApp, op: &Operation, token: Option<&str>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(op.method.as_bytes()).expect("method");
    let mut request = app.http.request(method, app.url(&op.url_path()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if matches!(op.method.as_str(), "POST" | "PUT" | "PATCH") {
        request = request
            .header("content-type", "application/json")
            .body("{}");
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_answers_a_documented_status() {
    // Development login on, so that its route exists.
    let app = spawn_app_with(|s| {
        s.development_mode = true;
        s.dev_login = true;
    })
    .await;
    let user = app.register().await;
    let mut ops = operations(&document(&app).await);
    // Logging out revokes the token the others use: last.
    ops.sort_by_key(|o| o.path == "/auth/logout");
    assert!(ops.len() >= 30, "only {} operations documented", ops.len());
    for op in &ops {
        let (status, body) = send(&app, op, Some(user.token())).await;
        let name = op.name();
        assert_ne!(status, 405, "{name}: method not allowed");
        assert!(
            !(status == 404 && body["error"]["message"] == "route not found"),
            "{name}: route not found"
        );
        assert!(
            op.statuses().contains(&status.to_string()),
            "{name} answered {status} {body}, which it does not document (documents {:?})",
            op.statuses()
        );
        if status >= 400 && body.is_object() {
            let code = body["error"]["code"].as_str();
            assert!(
                code.is_some(),
                "{name}: error without the error shape: {body}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_a_path_does_not_document_answer_405() {
    let app = spawn_app().await;
    let document = document(&app).await;
    let documented = documented_pairs(&document);
    let paths: BTreeSet<&String> = documented.iter().map(|(path, _)| path).collect();
    let mut checked = 0;
    for path in paths {
        // Any operation of the path supplies its path parameters.
        let sibling = document["paths"][path]
            .as_object()
            .and_then(|item| item.values().next().cloned())
            .expect("an operation");
        for method in METHODS {
            if documented.contains(&(path.clone(), method.to_string())) {
                continue;
            }
            let op = Operation {
                path: path.clone(),
                method: method.to_string(),
                op: sibling.clone(),
            };
            let (status, body) = send(&app, &op, None).await;
            assert_eq!(status, 405, "{}: {body}", op.name());
            assert_eq!(body["error"]["code"], "method_not_allowed", "{}", op.name());
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} undocumented methods tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_documented_exactly_where_a_token_is_required() {
    let app = spawn_app().await;
    let document = document(&app).await;
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["bearer_jwt"]["type"], "http");
    assert_eq!(schemes["bearer_jwt"]["scheme"], "bearer");
    assert_eq!(schemes["bearer_jwt"]["bearerFormat"], "JWT");
    assert_eq!(schemes["ws_ticket"]["in"], "query");

    let mut protected = 0;
    for op in operations(&document) {
        if op.is_websocket() {
            // Refused credentials still upgrade and are answered on the socket.
            assert!(op.requires_token() || op.op["security"].is_array());
            continue;
        }
        let (status, body) = send(&app, &op, None).await;
        let refused = status == 401 && body["error"]["code"] == "unauthorized";
        assert_eq!(
            op.requires_token(),
            refused,
            "{}: documents a required token: {}, answers without one: {status} {body}",
            op.name(),
            op.requires_token()
        );
        if op.requires_token() {
            assert!(
                op.statuses().contains("401"),
                "{}: 401 undocumented",
                op.name()
            );
            protected += 1;
        }
    }
    assert!(protected >= 15, "only {protected} protected operations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_responses_use_the_error_body_and_name_their_codes() {
    let app = spawn_app().await;
    let document = document(&app).await;
    let error_body = &document["components"]["schemas"]["ErrorBody"];
    assert_eq!(error_body["required"][0], "error");
    let detail = &document["components"]["schemas"]["ErrorDetail"];
    assert!(detail["properties"]["code"].is_object());
    assert!(detail["properties"]["message"].is_object());

    for op in operations(&document) {
        for (status, response) in op.op["responses"].as_object().expect("responses") {
            let is_error = status.starts_with('4') || status.starts_with('5');
            // The few non-JSON error answers (plain-text 400 of a non-upgrade /ws request,
            // /metrics without a recorder) say so with their content type.
            let response = match response["$ref"].as_str() {
                Some(reference) => {
                    let name = reference.rsplit('/').next().expect("name");
                    &document["components"]["responses"][name]
                }
                None => response,
            };
            let json = &response["content"]["application/json"];
            // `/health/ready` answers 503 with its own body (see docs/errors.md).
            let own_body = op.path == "/health/ready" && status == "503";
            if !is_error || json.is_null() || own_body {
                continue;
            }
            assert_eq!(
                json["schema"]["$ref"],
                "#/components/schemas/ErrorBody",
                "{} {status}",
                op.name()
            );
            let description = response["description"].as_str().unwrap_or("");
            assert!(
                description.contains("(code: `"),
                "{} {status}: the description names no error code: {description}",
                op.name()
            );
        }
    }
}

/// Fails the test where Python's `openapi-spec-validator` is missing, saying how to get it.
fn require_validator() {
    let found = std::process::Command::new("python3")
        .args(["-c", "import openapi_spec_validator"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !found {
        crate::helpers::missing_prerequisite(
            "Python's openapi-spec-validator is not installed, and this test runs it",
            "pip install openapi-spec-validator",
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_passes_openapi_spec_validator() {
    require_validator();
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &text).expect("write the document");
    let output = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("OK"),
        "openapi-spec-validator refused /openapi.json:\n{stdout}\n{stderr}"
    );

    // And it is not vacuous: a document with a broken reference is refused.
    let mut broken: Value = serde_json::from_str(&text).expect("json");
    broken["paths"]["/auth/me"]["get"]["responses"]["200"]["content"]["application/json"]
        ["schema"]["$ref"] = Value::from("#/components/schemas/NoSuchSchema");
    std::fs::write(&file, broken.to_string()).expect("write");
    let output = std::process::Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("run python3");
    assert!(
        !output.status.success(),
        "the validator accepted a dangling $ref: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_page_is_served_from_the_binary() {
    let app = spawn_app().await;
    let page = app
        .http
        .get(app.url("/docs"))
        .send()
        .await
        .expect("request");
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .expect("csp")
        .to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"));
    let html = page.text().await.expect("html");
    assert!(html.contains(r#"<script type="module" src="/assets/docs.js">"#));
    assert!(html.contains(r#"href="/assets/docs.css""#));

    let script = app
        .http
        .get(app.url("/assets/docs.js"))
        .send()
        .await
        .expect("request");
    assert_eq!(script.status(), 200);
    let script = script.text().await.expect("js");
    assert!(script.contains("fetch('/openapi.json')"));
    assert!(
        script.contains("'Bearer '"),
        "the try-it form sends the token"
    );
    assert!(!script.contains("https://") && !script.contains("http://"));
    let style = app
        .http
        .get(app.url("/assets/docs.css"))
        .send()
        .await
        .expect("request");
    assert_eq!(style.status(), 200);
}
