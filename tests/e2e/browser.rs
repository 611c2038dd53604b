//! A real headless Chromium driven over WebDriver (chromedriver), for the
//! console's tests and figures. Chromium and chromedriver come from Debian's
//! `chromium` and `chromium-driver`, installed on first use when missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Where tests save their screenshots.
pub fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Paths of chromium and chromedriver, installing them (apt-get, as root)
/// when missing; `None` (skip) only outside CI when that is not possible.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let browser =
        std::env::var_os("VULCAN_CHROMIUM").map_or("/usr/bin/chromium".into(), PathBuf::from);
    let driver = std::env::var_os("VULCAN_CHROMEDRIVER")
        .map_or("/usr/bin/chromedriver".into(), PathBuf::from);
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&target).unwrap();
    // One installer at a time across the test threads and processes.
    let lock = std::fs::File::create(target.join("chromium.lock")).unwrap();
    lock.lock().unwrap();
    if !(browser.exists() && driver.exists()) {
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let installed = apt(&["update", "-qq"])
            && apt(&["install", "-y", "-qq", "chromium", "chromium-driver"]);
        if !(installed && browser.exists() && driver.exists()) {
            assert!(
                std::env::var("CI").is_err(),
                "could not install chromium and chromium-driver (apt-get, as root)"
            );
            eprintln!("skipping: no chromium (apt-get install chromium chromium-driver failed)");
            return None;
        }
    }
    Some((browser, driver))
}

/// One chromedriver with one headless Chromium session.
pub struct Browser {
    pub client: Client,
    driver: std::process::Child,
    /// Where the browser saves downloads.
    pub downloads: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// A new browser with an empty profile, 1280×900; `None` as [`chromium`].
    pub async fn start() -> Option<Browser> {
        Self::start_with(&[]).await
    }

    /// As [`Browser::start`], with more Chromium switches (e.g.
    /// `--host-resolver-rules=…`).
    pub async fn start_with(extra: &[&str]) -> Option<Browser> {
        let (browser, driver) = chromium()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        let profile = tempfile::tempdir().unwrap();
        let profile_arg = format!("--user-data-dir={}", profile.path().display());
        let mut args = vec![
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-precise-memory-info",
            "--window-size=1280,900",
            &profile_arg,
        ];
        args.extend_from_slice(extra);
        let downloads = profile.path().join("downloads");
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": args,
                "prefs": {
                    "download.default_directory": downloads,
                    "download.prompt_for_download": false,
                },
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("failed to open a chromium session");
        Some(Browser {
            client,
            driver,
            downloads,
            _profile: profile,
        })
    }

    /// Opens `url` and waits for the console's script to have drawn `#main`.
    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.unwrap();
        self.wait_for("#main > *").await;
    }

    /// The element matching `css`, once there is one (30 s at most).
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no element `{css}` appeared: {e}"))
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Waits until `script` returns something other than null/false (90 s at
    /// most, for a 2-core machine running the rest of the suite beside it;
    /// checked every 20 ms), and returns it.
    pub async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.js(script, vec![]).await;
            if !(v.is_null() || v == Value::Bool(false)) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Types `text` into the element matching `css` (a path, for a file input).
    pub async fn type_into(&self, css: &str, text: &str) {
        self.wait_for(css).await.send_keys(text).await.unwrap();
    }

    /// Clicks the element matching `css`.
    pub async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.unwrap();
    }

    /// Waits until a workload page shows `status`.
    pub async fn until_status(&self, status: &str) {
        let script = format!(
            "const p = document.querySelector('#workload-status .pill');\
             return p !== null && p.dataset.status === '{status}';"
        );
        self.until(status, &script).await;
    }

    /// The bytes of the download named `name`, once it is complete.
    pub async fn downloaded(&self, name: &str) -> Vec<u8> {
        let path = self.downloads.join(name);
        let deadline = Instant::now() + Duration::from_secs(30);
        // Chromium writes `NAME.crdownload` and renames it when done.
        while !path.exists() {
            assert!(Instant::now() < deadline, "{name} was not downloaded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::read(path).unwrap()
    }

    /// Text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        self.wait_for(css).await.text().await.unwrap()
    }

    /// Saves a PNG of the window as `target/console-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(screenshot_dir().join(format!("{name}.png")), png).unwrap();
    }

    /// The visible log rows of a workload page: (seq, text).
    pub async fn log_rows(&self) -> Vec<(u64, String)> {
        let rows = self
            .js(
                "return [...document.querySelectorAll('#log .row:not([hidden]):not(.missing)')]\
                   .map(r => [Number(r.dataset.seq), r.children[2].textContent]);",
                vec![],
            )
            .await;
        serde_json::from_value(rows).unwrap()
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that panicked never reached close(): chromedriver takes its
        // Chromium with it when it goes.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
