//! The web console: a small single-page app embedded in the binary.
//!
//! Owns the console's pages and assets (`host/console/`) and the headers that
//! keep them safe; it holds no data and needs no token: everything it shows
//! comes from the same API any client uses, with the token the user gives it.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLE: &str = include_str!("../../console/app.css");
const ICON: &str = include_str!("../../console/icon.svg");

/// Scripts and styles only from this origin (no inline script, no `eval`),
/// connections only to this API, never framed.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes: its pages (each a URL that can be shared) and assets.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/workloads/{id}", get(page))
        .route("/run", get(page))
        .route("/modules", get(page))
        .route("/console/app.js", get(|| asset("text/javascript", SCRIPT)))
        .route("/console/app.css", get(|| asset("text/css", STYLE)))
        .route("/console/icon.svg", get(|| asset("image/svg+xml", ICON)))
}

/// Every page is the same document; the script draws the one its path names.
async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX).await
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    let fixed = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // Assets change with the binary; revalidation is cheap on loopback.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    for (name, value) in fixed {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
