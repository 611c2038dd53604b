//! Signals `serve` and `run` handle themselves instead of dying by them.

use anyhow::Context as _;

/// SIGINT and SIGTERM, registered when created: a signal that arrives after
/// the server said it is listening, or after `run` started its workload, is
/// always handled (a clean shutdown, a kill), never the default fatal action.
pub(super) struct ShutdownSignal {
    #[cfg(unix)]
    signals: (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
}

impl ShutdownSignal {
    pub(super) fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let interrupt = signal(SignalKind::interrupt()).context("failed to handle SIGINT")?;
            let terminate = signal(SignalKind::terminate()).context("failed to handle SIGTERM")?;
            Ok(Self {
                signals: (interrupt, terminate),
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    pub(super) async fn received(self) {
        #[cfg(unix)]
        {
            let (mut interrupt, mut terminate) = self.signals;
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
