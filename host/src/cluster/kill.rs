//! Kills across nodes: a pending workload is ended where its record is (it
//! never starts); a running one is killed by its node, asked on
//! `vulcan.kill.<node>` (signed when the cluster has a secret).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::dispatch::ended;
use super::{Cluster, ClusterError, kill_subject};
use crate::view::KillOutcome;
use crate::workload::{FailureKind, Status, WorkloadId};

/// A request on `vulcan.kill.<node>`.
#[derive(Debug, Serialize, Deserialize)]
struct KillRequest {
    id: WorkloadId,
    reason: String,
}

impl Cluster {
    /// Stops `id` wherever it is: a pending one never starts, a running one
    /// is killed on its node. The final record once it ended within `wait`.
    pub async fn kill(
        &self,
        id: WorkloadId,
        reason: &str,
        wait: Duration,
    ) -> Result<KillOutcome, ClusterError> {
        loop {
            let current = self.record(id).await?;
            match current.view.summary.status {
                Status::Pending => {
                    let view = ended(
                        current.view,
                        Status::Killed,
                        FailureKind::Killed,
                        reason.to_owned(),
                    );
                    if self.swap(&view, current.revision).await?.is_some() {
                        // Ends its followers' streams; never started, it has no lines.
                        let _ = self.publish_end(id, Some(0), 0).await;
                        return Ok(KillOutcome::Ended(Box::new(view)));
                    }
                }
                Status::Running => {
                    let node = current.view.summary.node.clone().unwrap_or_default();
                    if node == self.node_id {
                        self.kill_here(id, reason);
                    } else {
                        let request = serde_json::to_vec(&KillRequest {
                            id,
                            reason: reason.to_owned(),
                        })
                        .map_err(anyhow::Error::from)?;
                        // No answer: the node may be gone; its loss ends the workload.
                        let subject = kill_subject(&node);
                        let _ = match &self.signer {
                            Some(signer) => {
                                let headers = signer.sign(&subject, &request);
                                self.client
                                    .request_with_headers(subject, headers, request.into())
                                    .await
                            }
                            None => self.client.request(subject, request.into()).await,
                        };
                    }
                    return Ok(match tokio::time::timeout(wait, self.wait_end(id)).await {
                        Ok(view) => KillOutcome::Ended(Box::new(view?)),
                        Err(_) => KillOutcome::Stopping,
                    });
                }
                status => return Ok(KillOutcome::AlreadyEnded(status)),
            }
        }
    }

    /// Kills a workload claimed here, or marks it to be killed once started.
    pub(super) fn kill_here(&self, id: WorkloadId, reason: &str) -> bool {
        if self.node.runner().kill(id, reason) {
            return true;
        }
        let mut claimed = self.lock_claimed();
        match claimed.get_mut(&id) {
            Some(kill) => {
                *kill = Some(reason.to_owned());
                drop(claimed);
                // It may have started in between.
                self.node.runner().kill(id, reason);
                true
            }
            None => false,
        }
    }

    /// Answers kill requests for workloads on this node.
    pub(super) async fn take_kills(self: Arc<Self>, mut requests: async_nats::Subscriber) {
        while let Some(message) = requests.next().await {
            if let Some(signer) = &self.signer
                && let Some(why) = signer.refusal(
                    message.subject.as_str(),
                    message.headers.as_ref(),
                    &message.payload,
                )
            {
                tracing::warn!(subject = %message.subject, "refusing a kill request: {why}");
                if let Some(reply) = message.reply {
                    let _ = self.client.publish(reply, "refused".into()).await;
                }
                continue;
            }
            let answer = match serde_json::from_slice::<KillRequest>(&message.payload) {
                Ok(k) => match self.kill_here(k.id, &k.reason) {
                    true => "killing",
                    false => "not running here",
                },
                Err(e) => {
                    tracing::warn!(error = %e, "dropping a kill request that does not parse");
                    "malformed"
                }
            };
            if let Some(reply) = message.reply {
                let _ = self.client.publish(reply, answer.into()).await;
            }
        }
    }
}
