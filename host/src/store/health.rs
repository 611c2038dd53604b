//! Whether the store can still write: a writer thread that ended (a panic,
//! a test's fault switch) is the one failure the server cannot live through.
//!
//! Owns the reason and the wake-up of whoever watches for it (`vulcan
//! serve`, which answers `/healthz` with 503 and exits); no SQL, no threads.

use std::sync::OnceLock;

use tokio::sync::Notify;

/// The first reason a writer stopped, shared by every file's writer.
#[derive(Default)]
pub(super) struct StoreHealth {
    stopped: OnceLock<String>,
    changed: Notify,
}

impl StoreHealth {
    /// Records that a writer stopped (the first reason is kept).
    pub(super) fn stopped(&self, why: String) {
        tracing::error!(error = %why, "the store cannot write any more");
        let _ = self.stopped.set(why);
        // A stored permit: a watcher that is not waiting yet still wakes.
        self.changed.notify_one();
    }

    /// Why the store cannot write, once that happened.
    pub(super) fn failure(&self) -> Option<String> {
        self.stopped.get().cloned()
    }

    /// Resolves with the reason once a writer has stopped.
    pub(super) async fn wait(&self) -> String {
        loop {
            if let Some(why) = self.failure() {
                return why;
            }
            self.changed.notified().await;
        }
    }
}

/// Runs a writer thread's body; if it panics, `health` says so with the
/// panic's message.
pub(super) fn supervised(name: &str, health: &StoreHealth, body: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        health.stopped(format!("the database writer of {name} stopped: {message}"));
    }
}
