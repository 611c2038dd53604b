//! The API in process, through the router: request parsing, every error code
//! and its JSON shape, and that a refused request changes nothing. (The
//! end-to-end tests drive the same API over real sockets.)

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::{ApiConfig, AppState, router};
use crate::node::{Node, NodeOptions};
use crate::service::{Service, ServiceConfig};

struct Api {
    _dir: tempfile::TempDir,
    node: Arc<Node>,
    app: axum::Router,
}

async fn api(config: ApiConfig, options: NodeOptions) -> Api {
    with_service(config, ServiceConfig::default(), options).await
}

async fn with_service(config: ApiConfig, service: ServiceConfig, options: NodeOptions) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::open(dir.path(), options).await.unwrap();
    let service = Service::local(Arc::clone(&node), service);
    let app = router(AppState::new(service, config));
    Api {
        _dir: dir,
        node,
        app,
    }
}

/// A request body and its content type.
#[derive(Clone)]
enum Sent {
    Wasm(Vec<u8>),
    Json(Value),
    Text(&'static str),
    Nothing,
}

impl Sent {
    fn into_parts(self) -> (&'static str, Vec<u8>) {
        match self {
            Sent::Wasm(bytes) => ("application/wasm", bytes),
            Sent::Json(v) => ("application/json", v.to_string().into_bytes()),
            // Text sent as JSON is malformed JSON; to the module endpoints it
            // is the wrong media type.
            Sent::Text(t) if t == "{" => ("application/json", t.as_bytes().to_vec()),
            Sent::Text(t) => ("text/plain", t.as_bytes().to_vec()),
            Sent::Nothing => ("application/json", Vec::new()),
        }
    }
}

fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Api {
    async fn call(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (parts.status, parts.headers, json)
    }

    async fn send(
        &self,
        method: Method,
        uri: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap();
        let (status, _, json) = self.call(req).await;
        (status, json)
    }

    /// Runs a module uploaded as `application/wasm` to `uri`.
    async fn run(&self, uri: &str, module: &[u8]) -> (StatusCode, Value) {
        self.send(Method::POST, uri, "application/wasm", module.to_vec())
            .await
    }

    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.send(Method::GET, uri, "application/json", Vec::new())
            .await
    }

    async fn workload_count(&self) -> u64 {
        self.node
            .db()
            .list_workloads(&crate::workload::ListRequest::page(1, 0))
            .await
            .unwrap()
            .total
    }
}

#[tokio::test]
async fn every_refused_request_gets_its_status_and_code_and_changes_nothing() {
    let config = ApiConfig {
        max_upload: 4096,
        max_spec: 256,
        ..ApiConfig::default()
    };
    let options = NodeOptions {
        outbound: crate::outbound::OutboundPolicy {
            caps: Some(vec!["https://*.example.com".parse().unwrap()]),
            ..Default::default()
        },
        ..NodeOptions::default()
    };
    let api = api(config, options).await;
    let hello = wasm(wat_fixture!("print-hello"));
    let (status, done) = api.run("/v1/workloads", &hello).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let ended = done["id"].as_str().unwrap().to_owned();
    let unknown = crate::workload::WorkloadId::new().to_string();
    let zeros = format!("sha256:{}", "0".repeat(64));
    let (wasm, garbage) = (
        Sent::Wasm(hello.clone()),
        b"\0asm\x01\0\0\0garbage".to_vec(),
    );
    let big_stdin = json!({"module_base64": b64(&hello), "stdin": "x".repeat(300)});
    // Each is allowed by the server's cap; together they pass --max-spec-size.
    let many_hosts = json!({"module_base64": b64(&hello),
        "allowed_hosts": vec!["https://a.example.com"; 30]});
    use Sent::{Json, Nothing, Text, Wasm};
    let cases: Vec<(Method, String, Sent, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/workloads".into(),
            Text("{"),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(json!({"modul": "x"})),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?bogus=1".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?timeout_ms=0".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?queue_timeout_ms=0".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads/async?retry_max_attempts=3&retry_backoff_ms=-1".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads/async?retry_max_attempts=3&retry_on=exit,killed".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads/async?retry_max_attempts=many".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads/async?idempotency_key=has%20space".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads/async".into(),
            Json(json!({"module_base64": b64(&hello), "idempotency_key": "k".repeat(256)})),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?max_memory_bytes=1&max_memory_mb=1".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?timeout_ms=99999999999".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Wasm(garbage),
            400,
            "invalid_module",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Wasm(b"text".to_vec()),
            400,
            "invalid_module",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Text("hi"),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/modules".into(),
            Text("hi"),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/modules".into(),
            Wasm(vec![0; 5000]),
            413,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(big_stdin),
            413,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(many_hosts),
            413,
            "payload_too_large",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(json!({"module": zeros})),
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/workloads/not-an-id".into(),
            Nothing,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/workloads/{unknown}"),
            Nothing,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/workloads/{unknown}/logs"),
            Nothing,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/workloads/{unknown}/logs/history"),
            Nothing,
            404,
            "not_found",
        ),
        (
            Method::GET,
            format!("/v1/workloads/{ended}/logs?format=html"),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/workloads/{ended}/logs/history?limit=0"),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/modules/sha256:zz".into(),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            format!("/v1/modules/{zeros}"),
            Nothing,
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(json!({"module_base64": b64(&hello), "allowed_hosts": ["api.example.com"]})),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads?allowed_host=ftp%3A%2F%2Fexample.com".into(),
            wasm.clone(),
            400,
            "bad_request",
        ),
        (
            Method::POST,
            "/v1/workloads".into(),
            Json(json!({"module_base64": b64(&hello), "allowed_hosts": ["https://evil.net"]})),
            403,
            "outbound_not_permitted",
        ),
        (
            Method::POST,
            "/v1/workloads/async".into(),
            Json(
                json!({"module_base64": b64(&hello), "allowed_hosts": ["http://api.example.com"]}),
            ),
            403,
            "outbound_not_permitted",
        ),
        (
            Method::GET,
            "/v1/workloads?limit=0".into(),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/workloads?status=bogus".into(),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/workloads?offset=-1".into(),
            Nothing,
            400,
            "bad_request",
        ),
        (
            Method::GET,
            "/v1/workloads?before=not-an-id".into(),
            Nothing,
            400,
            "bad_request",
        ),
        (Method::GET, "/nope".into(), Nothing, 404, "not_found"),
        (
            Method::PUT,
            "/v1/workloads".into(),
            Nothing,
            405,
            "method_not_allowed",
        ),
        (
            Method::DELETE,
            format!("/v1/workloads/{ended}"),
            Nothing,
            409,
            "conflict",
        ),
    ];
    for (method, uri, sent, want, code) in cases {
        let (content_type, body) = sent.into_parts();
        let (status, answer) = api.send(method.clone(), &uri, content_type, body).await;
        assert_eq!(status.as_u16(), want, "{method} {uri}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{method} {uri}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{method} {uri}: {answer}");
    }
    assert_eq!(
        api.workload_count().await,
        1,
        "no refused request created a workload"
    );
    let (_, record) = api.get(&format!("/v1/workloads/{ended}")).await;
    assert_eq!(record, done, "nothing changed the finished workload");
}

#[tokio::test]
async fn a_token_guards_everything_but_health() {
    let service = ServiceConfig {
        tenants: std::sync::Arc::new(crate::tenants::Tenants::load(None, Some("s3cret")).unwrap()),
        ..ServiceConfig::default()
    };
    let api = with_service(ApiConfig::default(), service, NodeOptions::default()).await;
    let (status, answer) = api.get("/v1/workloads").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer["error"]["code"], "unauthorized");
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    let req = Request::get("/v1/workloads")
        .header(header::AUTHORIZATION, "Bearer s3cret")
        .body(Body::empty())
        .unwrap();
    assert_eq!(api.call(req).await.0, StatusCode::OK);
}

#[tokio::test]
async fn at_capacity_runs_queue_up_to_max_queued_and_a_queued_run_can_time_out_or_be_killed() {
    let options = NodeOptions {
        max_concurrent: Some(1),
        ..NodeOptions::default()
    };
    let service = ServiceConfig {
        max_queued: 1,
        ..ServiceConfig::default()
    };
    let api = with_service(ApiConfig::default(), service, options).await;
    let spin = wasm(wat_fixture!("spin"));
    let (status, running) = api.run("/v1/workloads/async", &spin).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, queued) = api.run("/v1/workloads/async", &spin).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let queued_id = queued["id"].as_str().unwrap().to_owned();
    let (_, record) = api.get(&format!("/v1/workloads/{queued_id}")).await;
    assert_eq!(record["status"], "pending");
    assert!(record["queued_at"].is_string(), "{record}");
    let (status, queue) = api.get("/v1/queue").await;
    assert_eq!(status, StatusCode::OK);
    let depth = (queue["queued"].as_u64(), queue["max_queued"].as_u64());
    assert_eq!(depth, (Some(1), Some(1)), "{queue}");
    assert_eq!(queue["tenants"][0]["running"], 1, "{queue}");

    // Beyond --max-queued: 503 queue_full, and nothing is created.
    let req = Request::post("/v1/workloads/async")
        .header(header::CONTENT_TYPE, "application/wasm")
        .body(Body::from(spin.clone()))
        .unwrap();
    let (status, headers, answer) = api.call(req).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer["error"]["code"], "queue_full");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let (_, list) = api.get("/v1/workloads").await;
    assert_eq!(list["total"], 2, "{list}");

    // A kill takes the queued one out before it starts.
    let api = &api;
    let kill = |id: String| async move {
        let uri = format!("/v1/workloads/{id}");
        api.send(Method::DELETE, &uri, "application/json", vec![])
            .await
    };
    let (status, killed) = kill(queued_id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(killed["status"], "killed");
    assert!(killed["started_at"].is_null(), "{killed}");

    // A sync run that waits past its queue_timeout_ms ends failed, unstarted.
    let (status, timed_out) = api.run("/v1/workloads?queue_timeout_ms=50", &spin).await;
    assert_eq!(status, StatusCode::OK, "{timed_out}");
    assert_eq!(timed_out["status"], "failed");
    assert_eq!(timed_out["failure"], "queue_timeout");
    assert!(timed_out["started_at"].is_null(), "{timed_out}");

    let (status, killed) = kill(running["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(killed["status"], "killed");
}

#[tokio::test]
async fn the_three_request_shapes_give_the_guest_its_spec() {
    let api = api(ApiConfig::default(), NodeOptions::default()).await;
    let hello = wasm(wat_fixture!("print-hello"));
    let query = "argv0=h.wasm&arg=a&arg=b%20c&env=K%3DV&max_memory_bytes=3000000&timeout_ms=9000";
    let (status, by_query) = api.run(&format!("/v1/workloads?{query}"), &hello).await;
    assert_eq!(status, StatusCode::OK, "{by_query}");
    assert_eq!(by_query["args"], json!(["h.wasm", "a", "b c"]));
    assert_eq!(by_query["limits"]["max_memory_bytes"], 3_000_000);
    assert_eq!(by_query["limits"]["timeout_ms"], 9000);
    assert_eq!(by_query["status"], "completed");
    assert_eq!(by_query["line_count"], 1);

    let hash = by_query["module"].as_str().unwrap();
    let spec = json!({"module": hash, "args": ["x"], "limits": {"max_memory_mb": 2}});
    let (status, by_hash) = api
        .send(
            Method::POST,
            "/v1/workloads",
            "application/json",
            spec.to_string().into_bytes(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_hash}");
    assert_eq!(by_hash["limits"]["max_memory_bytes"], 2 << 20);
    assert_eq!(by_hash["args"], json!(["workload.wasm", "x"]));

    let mut form =
        b"--XB\r\nContent-Disposition: form-data; name=\"module\"; filename=\"h.wasm\"\r\n\
        Content-Type: application/wasm\r\n\r\n"
            .to_vec();
    form.extend_from_slice(&hello);
    form.extend_from_slice(
        b"\r\n--XB\r\nContent-Disposition: form-data; name=\"spec\"\r\n\r\n\
        {\"args\":[\"m\"],\"limits\":{\"fuel\":100000}}\r\n--XB--\r\n",
    );
    let (status, by_form) = api
        .send(
            Method::POST,
            "/v1/workloads",
            "multipart/form-data; boundary=XB",
            form,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{by_form}");
    assert_eq!(by_form["args"][1], "m");
    assert_eq!(by_form["limits"]["fuel"], 100_000);
    assert_eq!(by_form["module"], by_query["module"]);

    let (status, history) = api
        .get(&format!(
            "/v1/workloads/{}/logs/history",
            by_hash["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(history["lines"][0]["line"], "hello");
    assert_eq!(history["lines"][0]["stream"], "stdout");
    assert_eq!(history["next_after"], 0);
}
