//! The web console in a real headless Chromium against a real `vulcan serve`:
//! run through the form, live lines, kill, text-only rendering, the token,
//! a live table, a long log, a retried workload followed across its
//! attempts. Each test saves screenshots under
//! `target/console-screenshots/`.

use serde_json::{Value, json};

use crate::browser::Browser;
use crate::support::*;

/// A browser, or a skip outside CI when none can be installed.
macro_rules! browser {
    () => {
        match Browser::start().await {
            Some(b) => b,
            None => return,
        }
    };
}

#[tokio::test]
async fn a_module_run_through_the_form_shows_its_lines_live_and_in_order() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let browser = browser!();
    browser.open(&format!("{}/run", server.url)).await;
    browser
        .type_into("#run-file", example("ticker").to_str().unwrap())
        .await;
    // 300 lines, one every 20 ms: long enough to be watched while it runs,
    // even when the suite's other tests load the machine.
    browser.type_into("#run-args", "300\n20000").await;
    browser.screenshot("run-form").await;
    browser.click("#run-submit").await;

    let id = browser
        .until(
            "the workload's page",
            "const m = location.pathname.match(/^\\/workloads\\/(.+)$/); return m && m[1];",
        )
        .await
        .as_str()
        .unwrap()
        .to_owned();
    // Lines are on the page while the workload still runs.
    let seen_running = browser
        .until(
            "lines while running",
            "const n = document.querySelectorAll('#log .row:not([hidden]):not(.missing)').length;\
             const p = document.querySelector('#workload-status .pill');\
             const s = p && p.dataset.status;\
             return s === 'running' && n > 0 ? n : (s && s !== 'running' && s !== 'pending' ? -1 : null);",
        )
        .await;
    assert!(
        seen_running.as_i64().unwrap() > 0,
        "the workload ended before any line was seen live"
    );
    browser.screenshot("workload-running").await;
    browser.until_status("completed").await;
    browser
        .until(
            "300 lines",
            "return document.querySelector('#log-count').textContent === '300 lines';",
        )
        .await;
    let rows = browser.log_rows().await;
    assert!(!rows.is_empty());
    // The view follows the tail: the last line is shown, seqs are contiguous
    // and each line's clock reading is later than the one before.
    assert_eq!(rows.last().unwrap().0, 299, "{rows:?}");
    for pair in rows.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "{rows:?}");
        let (a, b): (u128, u128) = (pair[0].1.parse().unwrap(), pair[1].1.parse().unwrap());
        assert!(b > a, "{rows:?}");
    }
    // The page shows what the store holds.
    let (_, stored) = server
        .get_json(&format!("/v1/workloads/{id}/logs/history?limit=1000"))
        .await;
    let stored = stored["lines"].as_array().unwrap();
    assert_eq!(stored.len(), 300);
    for (seq, text) in &rows {
        assert_eq!(stored[*seq as usize]["line"].as_str(), Some(text.as_str()));
    }
    assert_eq!(browser.text("#record .pill").await, "completed");
    browser.screenshot("workload-completed").await;

    // The uploaded module is listed.
    browser.open(&format!("{}/modules", server.url)).await;
    let kind = browser.text("#module-rows tr td:nth-child(2)").await;
    assert_eq!(kind, "p1 module");
    browser.screenshot("modules").await;
    browser.close().await;
}

#[tokio::test]
async fn kill_stops_a_spinning_workload_with_one_click() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let id = server.start_wasm("spin", "").await;
    let browser = browser!();
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    browser.until_status("running").await;
    browser
        .until(
            "the kill button enabled",
            "return !document.querySelector('#kill').disabled;",
        )
        .await;
    browser.click("#kill").await;
    browser.until_status("killed").await;
    let (_, record) = server.get_json(&format!("/v1/workloads/{id}")).await;
    assert_eq!(record["status"], "killed");
    assert!(
        browser
            .js("return document.querySelector('#kill').disabled;", vec![])
            .await
            .as_bool()
            .unwrap(),
        "a killed workload cannot be killed again"
    );
    browser.screenshot("workload-killed").await;
    browser.close().await;
}

#[tokio::test]
async fn what_a_guest_prints_is_shown_as_text_never_as_html() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let hash = server
        .upload(std::fs::read(example("stdin-echo")).unwrap())
        .await
        .1["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let hostile = [
        "<script>window.__owned = 1</script>",
        "<img src=x onerror=\"window.__owned = 2\">",
        "<b>not bold</b> & &amp; done",
    ];
    let id = server
        .start_json(&json!({
            "module": hash,
            "args": ["<i onmouseover=\"window.__owned = 3\">arg</i>"],
            "stdin": format!("{}\n", hostile.join("\n")),
        }))
        .await;
    let browser = browser!();
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    // The count can be drawn before the rows are: both are waited for.
    browser
        .until(
            "four lines",
            "return document.querySelector('#log-count').textContent === '4 lines' \
               && document.querySelectorAll('#log .row:not([hidden]):not(.missing)').length === 4;",
        )
        .await;
    let rows = browser.log_rows().await;
    let texts: Vec<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(&texts[..3], &hostile[..], "{rows:?}");
    let verdict = browser
        .js(
            "return {\
               owned: window.__owned === undefined ? null : window.__owned,\
               injected: document.querySelectorAll('#log img, #log script, #log b, #record i').length,\
               args: document.querySelector('#record-args').textContent,\
             };",
            vec![],
        )
        .await;
    assert_eq!(verdict["owned"], Value::Null, "{verdict}");
    assert_eq!(verdict["injected"], 0, "{verdict}");
    assert!(
        verdict["args"]
            .as_str()
            .unwrap()
            .contains("<i onmouseover=\\\"window.__owned = 3\\\">arg</i>"),
        "{verdict}"
    );
    // And the page is served with a policy that forbids inline script.
    let page = server.http.get(&server.url).send().await.unwrap();
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'") && !policy.contains("unsafe-inline"));
    // The download is the log as text, as the guest wrote it.
    browser.click("#download").await;
    let text = browser.downloaded(&format!("{id}.log")).await;
    let expected = format!("{}\necho", hostile.join("\n"));
    assert!(
        String::from_utf8(text).unwrap().starts_with(&expected),
        "the downloaded log differs"
    );
    browser.screenshot("html-as-text").await;
    browser.close().await;
}

#[tokio::test]
async fn a_token_protected_server_shows_nothing_until_the_token_is_given() {
    let env = Env::new();
    let server = Server::start(&env, &["--token", "console-s3cret"]);
    let id = server.start_wasm("hello", "arg=tokened").await;
    let browser = browser!();
    browser.open(&server.url).await;
    browser.wait_for("#token-dialog[open]").await;
    let before = browser
        .js(
            "return document.querySelectorAll('#workload-rows tr').length;",
            vec![],
        )
        .await;
    assert_eq!(before, 0, "rows shown without a token");
    browser.screenshot("token-prompt").await;

    // A wrong token is refused and asked again.
    browser.type_into("#token-input", "wrong").await;
    browser.click("#token-form button").await;
    browser
        .until(
            "the refusal",
            "const e = document.querySelector('#token-error');\
             return !e.hidden && document.querySelector('#token-dialog').open && e.textContent;",
        )
        .await;
    browser.type_into("#token-input", "console-s3cret").await;
    browser.click("#token-form button").await;
    browser
        .wait_for(&format!("#workload-rows tr[data-id='{id}']"))
        .await;
    // SSE carries the token too: the workload's line arrives.
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    browser
        .until(
            "the line over SSE",
            "return document.querySelector('#log-count').textContent === '1 line';",
        )
        .await;
    let url = browser.client.current_url().await.unwrap();
    assert!(!url.as_str().contains("s3cret"), "token in the URL: {url}");
    browser.screenshot("token-given").await;
    browser.close().await;
}

#[tokio::test]
async fn the_workloads_table_updates_without_a_reload() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let browser = browser!();
    browser.open(&server.url).await;
    browser.wait_for("#workloads").await;
    // A marker that a reload would wipe.
    browser.js("window.__same_page = 42;", vec![]).await;

    let done = server.start_wasm("hello", "arg=one").await;
    browser
        .wait_for(&format!(
            "#workload-rows tr[data-id='{done}'][data-status='completed']"
        ))
        .await;
    let spinning = server.start_wasm("spin", "").await;
    browser
        .wait_for(&format!(
            "#workload-rows tr[data-id='{spinning}'][data-status='running']"
        ))
        .await;
    browser.screenshot("workloads-live").await;
    server.kill(&spinning).await;
    browser
        .wait_for(&format!(
            "#workload-rows tr[data-id='{spinning}'][data-status='killed']"
        ))
        .await;
    // Newest first.
    let order = browser
        .js(
            "return [...document.querySelectorAll('#workload-rows tr')].map(r => r.dataset.id);",
            vec![],
        )
        .await;
    assert_eq!(order, json!([spinning, done]));
    assert_eq!(browser.js("return window.__same_page;", vec![]).await, 42);

    // The filter asks the server for one status.
    browser
        .js(
            "const f = document.querySelector('#status-filter'); f.value = 'killed';\
             f.dispatchEvent(new Event('change'));",
            vec![],
        )
        .await;
    browser
        .until(
            "only the killed one",
            "const ids = [...document.querySelectorAll('#workload-rows tr')].map(r => r.dataset.id);\
             return ids.length === 1 && ids[0];",
        )
        .await;
    assert!(
        browser
            .client
            .current_url()
            .await
            .unwrap()
            .as_str()
            .ends_with("/?status=killed")
    );
    browser.close().await;
}

#[tokio::test]
async fn a_long_log_keeps_a_few_rows_in_the_dom_and_pages_the_rest() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let (status, record) = server.run_wasm("log-flood", "arg=100000").await;
    assert_eq!(
        (status, record["line_count"].as_u64()),
        (200, Some(100_000))
    );
    let id = record["id"].as_str().unwrap();
    let browser = browser!();
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    browser
        .until(
            "the count",
            "return document.querySelector('#log-count').textContent === '100,000 lines';",
        )
        .await;
    // Followed to the end: the last line is shown.
    browser
        .until(
            "the last line",
            "const rows = [...document.querySelectorAll('#log .row:not([hidden]):not(.missing)')];\
             return rows.length && rows[rows.length - 1].children[2].textContent === 'line 99999';",
        )
        .await;
    let rows = browser
        .js(
            "return document.querySelectorAll('#log .row').length;",
            vec![],
        )
        .await;
    assert!(rows.as_u64().unwrap() < 100, "{rows} rows in the DOM");

    // Scrolled to the middle, the lines there are fetched and shown (the
    // rows move on the next frame, hence the wait for them to leave the tail).
    browser
        .js(
            "const log = document.querySelector('#log'); log.scrollTop = log.scrollHeight / 2;",
            vec![],
        )
        .await;
    let middle = browser
        .until(
            "the middle lines",
            "const rows = [...document.querySelectorAll('#log .row:not([hidden])')];\
             if (!rows.length || rows.some(r => r.classList.contains('missing'))) return null;\
             if (Number(rows[0].dataset.seq) > 90000) return null;\
             return rows.map(r => [Number(r.dataset.seq), r.children[2].textContent]);",
        )
        .await;
    let middle: Vec<(u64, String)> = serde_json::from_value(middle).unwrap();
    assert!((40_000..60_000).contains(&middle[0].0), "{middle:?}");
    for (seq, text) in &middle {
        assert_eq!(text, &format!("line {seq}"));
    }
    assert!(
        !browser
            .js(
                "return document.querySelector('#log-follow').checked;",
                vec![]
            )
            .await
            .as_bool()
            .unwrap(),
        "scrolling up stops following"
    );

    // Search finds a line far below and shows it.
    browser.type_into("#log-search", "line 87654\n").await;
    browser
        .until(
            "the match",
            "const hit = document.querySelector('#log .row.hit');\
             return hit && hit.dataset.seq === '87654' && hit.querySelector('mark') !== null;",
        )
        .await;
    browser.screenshot("long-log-search").await;
    browser.close().await;
}

/// A TCP proxy in front of a server whose open connections the test can cut
/// (as a flaky network would), while new ones still get through.
struct CuttableProxy {
    url: String,
    connections: std::sync::Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let held = std::sync::Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                held.lock().unwrap().spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        CuttableProxy {
            url,
            connections,
            _accept: accept,
        }
    }

    /// Drops every open connection.
    fn cut(&self) {
        self.connections.lock().unwrap().abort_all();
    }
}

/// The live log viewer counted no seq skipped and none shown twice.
async fn assert_no_gap_or_repeat(browser: &Browser, when: &str) {
    let contract = browser
        .js(
            "const d = document.querySelector('#log').dataset; return [d.liveGaps, d.liveRepeats];",
            vec![],
        )
        .await;
    assert_eq!(contract, json!(["0", "0"]), "[gaps, repeats] {when}");
}

#[tokio::test]
async fn a_dropped_connection_resumes_without_gap_or_repeat() {
    let env = Env::new();
    let server = Server::start(&env, &[]);
    let proxy = CuttableProxy::start(&server.url).await;
    // A line every 10 ms for far longer than the test: the cut must land
    // while the workload runs however slowly the browser starts, so the
    // test ends it with a kill rather than waiting for a fixed count.
    let id = server.start_wasm("ticker", "arg=100000&arg=10000").await;
    let browser = browser!();
    browser.open(&format!("{}/workloads/{id}", proxy.url)).await;
    let count = "Number(document.querySelector('#log').dataset.liveNext)";
    browser
        .until("some lines", &format!("return {count} >= 50;"))
        .await;
    let at_cut = browser.js(&format!("return {count};"), vec![]).await;
    proxy.cut();
    let reconnected = browser
        .until(
            "lines after the cut",
            &format!(
                "const d = document.querySelector('#log').dataset;\
                 return {count} >= {} + 50 && d.reconnects;",
                at_cut.as_u64().unwrap()
            ),
        )
        .await;
    assert_ne!(reconnected, "0", "the cut went unnoticed");
    // A kill answers 200 with the final record once the workload has ended.
    let (status, record) = server.kill(&id).await;
    assert_eq!(
        (status, &record["status"]),
        (200, &json!("killed")),
        "{record}"
    );
    let total = record["line_count"].as_u64().unwrap();
    browser
        .until(
            "the stream's end",
            &format!(
                "const p = document.querySelector('#workload-status .pill');\
                 return p.dataset.status === 'killed' && {count} === {total};"
            ),
        )
        .await;
    assert_no_gap_or_repeat(&browser, "across the reconnect").await;
    // As the page writes numbers (1,985 in English), however many it got.
    let shown = browser
        .js(
            &format!("return ({total}).toLocaleString() + ' lines';"),
            vec![],
        )
        .await;
    assert_eq!(json!(browser.text("#log-count").await), shown);
    browser.screenshot("resumed").await;
    browser.close().await;
}

#[tokio::test]
async fn a_retried_workload_is_followed_across_its_attempts_and_lists_them() {
    let env = Env::new();
    let server = Server::start(&env, &["--max-concurrent", "1"]);
    // The one slot is busy: the retried workload waits in the queue while
    // the page opens, and everything after happens under its eyes.
    let spinning = server.start_wasm("spin", "").await;
    // `fails` logs a line, then returns an error: retried once.
    let spec = json!({
        "module_base64": b64(&std::fs::read(vulcan_test_artifacts::component("fails")).unwrap()),
        "input": "x",
        "retry": {"max_attempts": 2, "backoff_ms": 200, "max_backoff_ms": 200},
    });
    let id = server.start_json(&spec).await;
    let browser = browser!();
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    browser.until_status("pending").await;
    let (status, _) = server.kill(&spinning).await;
    assert_eq!(status, 200);
    browser.until_status("failed").await;
    let count = "Number(document.querySelector('#log').dataset.liveNext)";
    browser
        .until("both attempts' lines", &format!("return {count} === 2;"))
        .await;
    assert_no_gap_or_repeat(&browser, "across the attempts").await;
    let attempts = browser.text("#record-attempts").await;
    assert!(
        attempts.starts_with("attempt 1: returned_error after") && attempts.contains("line 0"),
        "{attempts}"
    );
    browser.screenshot("retried").await;
    browser.close().await;
}
