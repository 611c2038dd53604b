//! Console figures (`cargo bench --bench console`): a real `vulcan serve` and
//! a real headless Chromium (installed as the console tests install it),
//! printing:
//!
//! 1. time to first contentful paint and to the drawn workloads table, with
//!    1,000 workloads stored (median of 10 fresh loads);
//! 2. time from a guest printing a line to that line being in the DOM of a
//!    workload page following it (p50/p95; goal p50 ≤ 50 ms), from `ticker`,
//!    whose lines carry the wall-clock time they were written;
//! 3. with a 1,000,000-line log followed live to its end, then scrolled to 20
//!    places: DOM rows and elements, and JS heap (goal: bounded, < 5,000 rows).
//!
//! `VULCAN_BENCH_LINES` (default 1,000,000) changes the log's size.

use std::time::Instant;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};

#[path = "../../tests/e2e/browser.rs"]
#[allow(dead_code, reason = "the tests use more of it")]
mod browser;
mod common;

use browser::Browser;
use common::{BenchServer, env_or, start, upload};

fn main() -> anyhow::Result<()> {
    common::block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let lines: u64 = env_or("VULCAN_BENCH_LINES", 1_000_000);
    let dir = tempfile::tempdir()?;
    let server = BenchServer::start(dir.path(), &[])?;
    let http = reqwest::Client::new();
    let example = |name: &str| std::fs::read(vulcan_test_artifacts::example(name));
    let hello = upload(&http, &server.url, &example("hello")?).await?;
    let ticker = upload(&http, &server.url, &example("ticker")?).await?;
    let flood = upload(&http, &server.url, &example("log-flood")?).await?;
    let browser = Browser::start()
        .await
        .context("no chromium: apt-get install chromium chromium-driver")?;
    println!("console benchmark (one headless Chromium, one server)");

    // 1. First paint of the workloads page.
    for _ in 0..1000 {
        run_sync(&http, &server.url, &json!({"module": hello})).await?;
    }
    let (mut paint, mut table) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        browser.open(&format!("{}/", server.url)).await;
        let marks = browser
            .until(
                "the drawn table",
                "const m = performance.getEntriesByName('vulcan:workloads-drawn')[0];\
                 const p = performance.getEntriesByName('first-contentful-paint')[0];\
                 return m && p ? [p.startTime, m.startTime] : null;",
            )
            .await;
        paint.push(marks[0].as_f64().context("paint")?);
        table.push(marks[1].as_f64().context("mark")?);
    }
    println!(
        "  workloads page, 1,000 stored: first contentful paint {:.0} ms, table drawn {:.0} ms (median of 10)",
        median(&mut paint),
        median(&mut table)
    );

    // 2. Line -> DOM latency on a followed workload.
    let id = start(
        &http,
        &server.url,
        &json!({"module": ticker, "args": ["600", "10000"]}),
    )
    .await?;
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    browser.wait_for("#log .log-rows").await;
    browser
        .js(
            "window.__lat = []; const since = Date.now(); const seen = new Set();\
             new MutationObserver(() => {\
               const now = performance.timeOrigin + performance.now();\
               for (const r of document.querySelectorAll('#log .row:not([hidden]):not(.missing)')) {\
                 const t = r.children[2].textContent;\
                 if (seen.has(t)) continue; seen.add(t);\
                 const printed = Number(t) / 1e6;\
                 if (printed > since) window.__lat.push(now - printed);\
               }\
             }).observe(document.querySelector('#log .log-rows'), {childList: true, subtree: true, characterData: true});",
            vec![],
        )
        .await;
    browser
        .until(
            "the ticker's end",
            "const p = document.querySelector('#workload-status .pill');\
             return p && p.dataset.status === 'completed';",
        )
        .await;
    let mut latency: Vec<f64> =
        serde_json::from_value(browser.js("return window.__lat;", vec![]).await)?;
    ensure!(latency.len() > 100, "only {} lines measured", latency.len());
    latency.sort_by(f64::total_cmp);
    println!(
        "  line printed -> in the DOM: p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms over {} lines (goal p50 <= 50 ms)",
        pct(&latency, 0.50),
        pct(&latency, 0.95),
        latency[latency.len() - 1],
        latency.len()
    );

    // 3. A long log, followed live to its end, then scrolled around.
    let id = start(
        &http,
        &server.url,
        &json!({"module": flood, "args": [lines.to_string()]}),
    )
    .await?;
    let opened = Instant::now();
    browser
        .open(&format!("{}/workloads/{id}", server.url))
        .await;
    let count = group(lines);
    browser
        .until(
            "the whole log",
            &format!(
                "const p = document.querySelector('#workload-status .pill');\
                 return p && p.dataset.status === 'completed' &&\
                   document.querySelector('#log-count').textContent === '{count} lines';"
            ),
        )
        .await;
    let followed = opened.elapsed();
    let after_follow = dom_and_heap(&browser).await;
    let mut worst = after_follow.clone();
    let mut scroll_ms = Vec::new();
    for i in 0..20u64 {
        let fraction = (i * 7919 % 20) as f64 / 19.0;
        let started = Instant::now();
        browser
            .js(
                "const log = document.querySelector('#log');\
                 log.scrollTop = (log.scrollHeight - log.clientHeight) * arguments[0];",
                vec![json!(fraction)],
            )
            .await;
        browser
            .until(
                "the lines there",
                "const rows = [...document.querySelectorAll('#log .row:not([hidden])')];\
                 return rows.length > 0 && !rows.some(r => r.classList.contains('missing'));",
            )
            .await;
        scroll_ms.push(started.elapsed().as_secs_f64() * 1e3);
        let now = dom_and_heap(&browser).await;
        for key in ["rows", "elements", "heap"] {
            if now[key].as_f64() > worst[key].as_f64() {
                worst[key] = now[key].clone();
            }
        }
    }
    println!(
        "  {count}-line log followed live to its end in {:.1} s: {} rows, {} elements, JS heap {:.1} MiB",
        followed.as_secs_f64(),
        after_follow["rows"],
        after_follow["elements"],
        after_follow["heap"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  scrolled to 20 places: at most {} rows, {} elements, JS heap {:.1} MiB; lines shown after a jump in {:.0} ms median (goal < 5,000 rows)",
        worst["rows"],
        worst["elements"],
        worst["heap"].as_f64().unwrap_or(0.0) / 1048576.0,
        median(&mut scroll_ms)
    );
    browser.close().await;
    server.stop()?;
    Ok(())
}

/// DOM rows of the log, all elements, and the used JS heap after a GC hint.
async fn dom_and_heap(browser: &Browser) -> Value {
    browser
        .js(
            "return {rows: document.querySelectorAll('#log .row').length,\
                     elements: document.getElementsByTagName('*').length,\
                     heap: performance.memory ? performance.memory.usedJSHeapSize : null};",
            vec![],
        )
        .await
}

async fn run_sync(http: &reqwest::Client, url: &str, spec: &Value) -> anyhow::Result<()> {
    let resp = http
        .post(format!("{url}/v1/workloads"))
        .json(spec)
        .send()
        .await?;
    ensure!(resp.status().is_success(), "run: {}", resp.status());
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// `1000000` as the page prints it: `1,000,000`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
