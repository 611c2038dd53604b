//! The tasks a server cannot live without (the job queue's dispatcher, the
//! scheduler): each is watched, and one that panics or returns while the
//! server still runs marks the node failed, so `/healthz` answers 503 with
//! the reason and `vulcan serve` shuts down with a non-zero exit for its
//! supervisor to restart it. Owns only that watch, not the tasks' work.

use std::sync::{Arc, OnceLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Watches a node's vital tasks.
#[derive(Clone, Default)]
pub struct VitalTasks {
    failed: Arc<OnceLock<String>>,
    told: Arc<Notify>,
    /// Cancelled at shutdown: a vital task that ends then ends as asked.
    stopping: CancellationToken,
}

impl VitalTasks {
    /// Runs `task`, named `name`; its end before [`VitalTasks::stop`]
    /// (a panic included) fails the node.
    pub fn spawn(
        &self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let watched = tokio::spawn(task);
        let this = self.clone();
        tokio::spawn(async move {
            // Aborting the watch (the server's end) aborts the task too.
            let _abort = AbortOnDrop(watched.abort_handle());
            let why = match watched.await {
                Ok(()) => format!("the {name} stopped"),
                Err(e) if e.is_panic() => format!("the {name} panicked: {}", panic_text(e)),
                // Aborted with the server (its handle dropped at shutdown).
                Err(_) => return,
            };
            if !this.stopping.is_cancelled() {
                this.fail(why);
            }
        })
    }

    /// Marks the node failed with `why` (the first reason stays).
    pub fn fail(&self, why: String) {
        tracing::error!(error = %why, "a vital task failed; the server goes down");
        let _ = self.failed.set(why);
        self.told.notify_waiters();
    }

    /// Why the node failed, once it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Resolves with the reason once a vital task failed.
    pub async fn failed(&self) -> String {
        loop {
            let told = self.told.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            if let Some(why) = self.failure() {
                return why.to_owned();
            }
            told.await;
        }
    }

    /// From now on, vital tasks ending is the shutdown, not a failure.
    pub fn stop(&self) {
        self.stopping.cancel();
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    (payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_vital_task_that_panics_fails_the_node_and_one_stopped_at_shutdown_does_not() {
        let vital = VitalTasks::default();
        let ended = vital.spawn("queue dispatcher", async {});
        ended.await.unwrap();
        assert_eq!(vital.failure(), Some("the queue dispatcher stopped"));

        let vital = VitalTasks::default();
        let waiting = tokio::spawn({
            let vital = vital.clone();
            async move { vital.failed().await }
        });
        let panicked = vital.spawn("scheduler", async { panic!("bad tick") });
        panicked.await.unwrap();
        assert_eq!(waiting.await.unwrap(), "the scheduler panicked: bad tick");

        let vital = VitalTasks::default();
        vital.stop();
        vital.spawn("scheduler", async {}).await.unwrap();
        assert_eq!(vital.failure(), None);
    }
}
