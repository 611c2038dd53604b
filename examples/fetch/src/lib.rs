//! Sends one HTTP request and returns its status and body. Input:
//! `{"url": "https://api.example.com/v1/items"}`, optionally with `"method"`,
//! a text `"body"` and `"require_success": true` (then an answer outside
//! 2xx fails the run, as a job that needs its upstream would, e.g. to be
//! retried). The run must allow the host:
//! `vulcan run --allow-host https://api.example.com --input '{"url":"…"}' fetch.wasm`.
use serde::{Deserialize, Serialize};
use vulcan_guest::{Json, http, log};

#[derive(Deserialize)]
struct Fetch {
    url: String,
    #[serde(default = "get")]
    method: String,
    body: Option<String>,
    #[serde(default)]
    require_success: bool,
}

fn get() -> String {
    "GET".into()
}

#[derive(Serialize)]
struct Fetched {
    status: u16,
    content_type: Option<String>,
    body: String,
}

fn run(Json(fetch): Json<Fetch>) -> vulcan_guest::Result<Json<Fetched>> {
    log::info!(method = fetch.method, url = fetch.url; "sending");
    let mut request = http::Request::new(&fetch.method, &fetch.url);
    if let Some(body) = fetch.body {
        request = request.header("content-type", "text/plain").body(body);
    }
    let response = request.send()?;
    log::info!(status = response.status; "answered");
    if fetch.require_success && !(200..300).contains(&response.status) {
        vulcan_guest::bail!("{} answered {}", fetch.url, response.status);
    }
    Ok(Json(Fetched {
        status: response.status,
        content_type: response.header("content-type").map(str::to_owned),
        body: response.text()?,
    }))
}

vulcan_guest::workload!(run);
