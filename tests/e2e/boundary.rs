//! The browser boundary, attacked from a real headless Chromium: a page on
//! another origin that posts a workload (with `fetch` in `no-cors` mode, and
//! with an auto-submitted multipart form), and a page that rebinds its own
//! name to the server. Nothing is created, nothing is read; the console keeps
//! working at `127.0.0.1` and `localhost`.

use serde_json::{Value, json};

use crate::browser::Browser;
use crate::support::*;

macro_rules! browser {
    ($($arg:expr),*) => {
        match Browser::start_with(&[$($arg),*]).await {
            Some(b) => b,
            None => return,
        }
    };
}

/// Serves `html` at every path of a new loopback port: the attacker's site.
async fn attacker_site(html: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(move || {
        let html = html.clone();
        async move { axum::response::Html(html) }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// JavaScript that makes `bytes` a `Uint8Array` named `wasm`.
fn wasm_literal(bytes: &[u8]) -> String {
    format!(
        "const wasm = Uint8Array.from(atob('{}'), c => c.charCodeAt(0));",
        b64(bytes)
    )
}

async fn workload_count(server: &Server) -> u64 {
    let (status, list) = server.get_json("/v1/workloads").await;
    assert_eq!(status, 200, "{list}");
    list["total"].as_u64().unwrap()
}

#[tokio::test]
async fn a_page_of_another_origin_can_neither_fetch_nor_post_a_form_into_the_api() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let hello = std::fs::read(example("hello")).unwrap();
    let target = format!("{}/v1/workloads/async", server.url);
    let page = format!(
        r#"<!doctype html><title>attacker</title><body>
<form id="f" method="post" enctype="multipart/form-data" action="{target}">
  <input type="file" name="module" id="m">
</form>
<script>
{wasm}
window.tryFetch = () => {{
  const body = new FormData();
  body.append('module', new Blob([wasm], {{type: 'application/wasm'}}), 'hello.wasm');
  return fetch('{target}', {{method: 'POST', mode: 'no-cors', body}})
    .then(() => 'sent', e => 'failed: ' + e);
}};
window.submitForm = () => {{
  const files = new DataTransfer();
  files.items.add(new File([wasm], 'hello.wasm', {{type: 'application/wasm'}}));
  document.getElementById('m').files = files.files;
  document.getElementById('f').submit();
}};
</script>"#,
        wasm = wasm_literal(&hello),
    );
    let site = attacker_site(page).await;
    let browser = browser!();

    // fetch in no-cors mode: the browser sends it (the answer is opaque).
    browser.client.goto(&site).await.unwrap();
    let sent = browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1]; window.tryFetch().then(done);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        sent,
        json!("sent"),
        "the attack's request was not even sent"
    );
    assert_eq!(
        workload_count(&server).await,
        0,
        "a cross-origin fetch ran a workload"
    );

    // A form posted across origins navigates to the API's answer.
    browser.js("window.submitForm();", vec![]).await;
    let answer = browser
        .until(
            "the form's answer",
            &format!(
                "return location.href.startsWith('{}') && document.body && document.body.innerText;",
                server.url
            ),
        )
        .await;
    browser.screenshot("cross-site-form-refused").await;
    let answer: Value = serde_json::from_str(answer.as_str().unwrap()).unwrap();
    assert_eq!(answer["error"]["code"], "cross_site_request", "{answer}");
    assert_eq!(
        workload_count(&server).await,
        0,
        "a cross-origin form ran a workload"
    );

    // The server's own console, at either loopback name, still runs things.
    for base in [
        server.url.clone(),
        server.url.replace("127.0.0.1", "localhost"),
    ] {
        browser.open(&format!("{base}/run")).await;
        let status = browser
            .until(
                "the console's own POST",
                &format!(
                    "if (window.__status) return window.__status;\
                     if (!window.__asked) {{ window.__asked = true;\
                       {wasm}\
                       const body = new FormData();\
                       body.append('module', new Blob([wasm], {{type: 'application/wasm'}}), 'hello.wasm');\
                       fetch('/v1/workloads/async', {{method: 'POST', body}})\
                         .then(r => window.__status = r.status, e => window.__status = String(e)); }}\
                     return null;",
                    wasm = wasm_literal(&hello)
                ),
            )
            .await;
        assert_eq!(
            status,
            json!(202),
            "the console at {base} could not run a workload"
        );
    }
    assert_eq!(workload_count(&server).await, 2);
    browser.close().await;
}

#[tokio::test]
async fn a_page_that_rebinds_its_name_to_the_server_reads_nothing() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("hello", "").await;
    let port = server.url.rsplit(':').next().unwrap().to_owned();
    // The attacker's name now resolves to the server's address, as a DNS
    // rebinding would make it.
    let browser = browser!("--host-resolver-rules=MAP rebind.attacker.test 127.0.0.1");
    let rebound = format!("http://rebind.attacker.test:{port}");

    browser.client.goto(&format!("{rebound}/")).await.unwrap();
    let page = browser
        .until(
            "the refusal",
            "return document.body && document.body.innerText;",
        )
        .await;
    browser.screenshot("rebinding-refused").await;
    let page = page.as_str().unwrap();
    assert!(page.contains("misdirected_host"), "{page}");
    // The page's own script, same-origin with the rebound name, reads the list.
    let read = browser
        .until(
            "the page's read of the list",
            "if (window.__read) return window.__read;\
             if (!window.__asked) { window.__asked = true;\
               fetch('/v1/workloads').then(r => r.text()).then(t => window.__read = t, e => window.__read = String(e)); }\
             return null;",
        )
        .await;
    let read = read.as_str().unwrap();
    assert!(read.contains("misdirected_host"), "{read}");
    assert!(
        !read.contains(&id),
        "the rebinding page read a workload id: {read}"
    );

    // The same browser at the server's real names sees the workload.
    for base in [
        server.url.clone(),
        server.url.replace("127.0.0.1", "localhost"),
    ] {
        browser.open(&base).await;
        browser
            .until(
                "the workload in the console's list",
                &format!("return document.body.innerText.includes('{}');", &id[..10]),
            )
            .await;
    }
    browser.close().await;
}

#[tokio::test]
async fn hosts_and_origins_are_checked_for_plain_clients_too() {
    let env = Env::new();
    let server = Server::start(&env, &["--allowed-host", "vulcan.internal"]);
    let http = reqwest::Client::new();
    let get = |host: &'static str| {
        http.get(format!("{}/v1/workloads", server.url))
            .header("host", host)
            .send()
    };
    let refused = get("rebind.attacker.test").await.unwrap();
    assert_eq!(refused.status().as_u16(), 421);
    assert_error(&refused.json().await.unwrap(), "rebind.attacker.test");
    for host in ["vulcan.internal:8080", "localhost", "[::1]:1", "10.9.8.7"] {
        assert_eq!(get(host).await.unwrap().status().as_u16(), 200, "{host}");
    }
    // /healthz and the console are behind the same check.
    let health = http
        .get(format!("{}/healthz", server.url))
        .header("host", "evil.test")
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 421);

    // A cross-origin POST is refused before its body is read, and creates nothing.
    let hello = std::fs::read(example("hello")).unwrap();
    let post = |origin: Option<&'static str>| {
        let r = http
            .post(format!("{}/v1/workloads/async", server.url))
            .header("content-type", "application/wasm")
            .body(hello.clone());
        match origin {
            Some(o) => r.header("origin", o),
            None => r,
        }
    };
    let refused = post(Some("http://127.0.0.1:1")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "cross_site_request", "{body}");
    assert_eq!(workload_count(&server).await, 0);
    // A kill from another site is refused too.
    let id = server.start_wasm("hello", "").await;
    let kill = http
        .delete(format!("{}/v1/workloads/{id}", server.url))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(kill.status().as_u16(), 403);
    // The server's own origin, and no origin at all (curl, the CLI), work.
    let own = server.url.clone();
    let ok = http
        .post(format!("{}/v1/workloads/async", server.url))
        .header("content-type", "application/wasm")
        .header("origin", own)
        .body(hello.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    assert_eq!(post(None).send().await.unwrap().status().as_u16(), 202);
}
