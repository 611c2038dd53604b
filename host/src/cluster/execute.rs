//! Running a workload this node claimed: its guest on this node's runner,
//! its lines to the cluster beside this node's own store, its record listed
//! once it runs for long, and its final record written only once every
//! line is stored in the cluster.

use std::sync::Arc;

use futures_util::future::Either;
use tokio::sync::oneshot;

use super::dispatch::{Claim, Here, UNLISTED_FOR, ended};
use super::logs::ClusterLines;
use super::{Cluster, now_ms, until_done};
use crate::logs::LineSink;
use crate::runner::{Creation, Launch, LocalRecord, Slot};
use crate::workload::{Completion, FailureKind, Status, WorkloadSpec};

impl Cluster {
    /// Runs a claimed workload, records its end in the cluster once all its
    /// lines are stored there, and unclaims it.
    pub(super) async fn run_claimed(
        self: &Arc<Self>,
        module: String,
        spec: WorkloadSpec,
        claim: Claim,
        slot: Slot,
    ) {
        let id = claim.view.summary.id;
        self.run_and_record(module, spec, claim, slot).await;
        self.unclaim(id);
    }

    pub(super) async fn run_and_record(
        self: &Arc<Self>,
        module: String,
        spec: WorkloadSpec,
        claim: Claim,
        slot: Slot,
    ) {
        let id = claim.view.summary.id;
        let lines = ClusterLines::new(id);
        let publish = || {
            let (this, lines) = (Arc::clone(self), Arc::clone(&lines));
            tokio::spawn(async move { this.publish_lines(lines).await })
        };
        // A run nobody else knows of yet may end with its lines inside its
        // record: its publisher starts only once it is listed, or once it
        // has more lines than a record carries.
        let mut publisher = claim.revision.is_some().then(publish);
        let (ended_tx, ended_rx) = oneshot::channel();
        // How it ended, as soon as it did, and this node's own commit of
        // that end: the cluster's record is sent while that commit runs.
        let run = async {
            let compiled = match self.module(&module).await {
                Ok(compiled) => compiled,
                Err(e) => return Err(format!("failed to load module {module}: {e}")),
            };
            let launch = Launch {
                id,
                slot,
                module_hash: module.clone(),
                spec,
                tee: None,
                also: Some(Arc::clone(&lines) as Arc<dyn LineSink>),
                // What the API reads is the cluster's record, not this
                // node's: its guest need not wait for the local one.
                creation: Creation::Overlapped,
                ended: Some(ended_tx),
                record: LocalRecord::Copy,
                idempotency: None,
                held: None,
            };
            let started = match self.node.runner().start_claimed(compiled, launch).await {
                Ok(started) => started,
                Err(e) => return Err(format!("failed to start: {e}")),
            };
            // A kill that came while it was being started.
            let early_kill = self.lock_claimed().get(&id).cloned().flatten();
            if let Some(reason) = early_kill {
                self.node.runner().kill(id, &reason);
            }
            let local = async move {
                match started.done.await {
                    Ok(Ok(record)) => Ok(record),
                    Ok(Err(e)) => Err(format!("{e:#}")),
                    Err(e) => Err(format!("the workload's task failed: {e}")),
                }
            };
            match ended_rx.await {
                Ok(completion) => Ok((completion, Either::Left(async { local.await.map(drop) }))),
                // Ended without its guest's end being told (it could not
                // run): as this node stored it.
                Err(_) => local.await.map(|record| {
                    let completion = Completion {
                        status: record.status,
                        exit_code: record.exit_code,
                        error: record.error,
                        failure: record.failure,
                        output: record.output,
                        duration_ms: record.duration_ms.unwrap_or(0),
                        line_count: record.line_count,
                    };
                    (completion, Either::Right(std::future::ready(Ok(()))))
                }),
            }
        };
        tokio::pin!(run);
        let mut revision = claim.revision;
        let listed = tokio::time::sleep(UNLISTED_FOR);
        tokio::pin!(listed);
        // The running record is written beside the run, never in its way:
        // a NATS that does not answer must not hide the run's end.
        let mut listing: Option<std::pin::Pin<Box<dyn Future<Output = u64> + Send + '_>>> = None;
        let outcome = loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                () = &mut listed, if revision.is_none() && listing.is_none() => {
                    // Still running: listed, and killable from any node.
                    publisher.get_or_insert_with(publish);
                    let view = claim.view.clone();
                    listing = Some(Box::pin(async move {
                        until_done("running record", id, || self.create_own(&view, None)).await
                    }));
                }
                created = async { listing.as_mut().expect("listing").await }, if listing.is_some() => {
                    revision = Some(created);
                    listing = None;
                }
                () = lines.until_beyond_inline(), if publisher.is_none() => {
                    publisher = Some(publish());
                }
            }
        };
        // How it ended, as this node knows it: what a sync caller here is
        // told at once, and (with the cluster's line count) the final record.
        let (mut view, local) = match outcome {
            Ok((completion, local)) => (claim.view.end(completion, now_ms()), local),
            Err(error) => (
                ended(claim.view, Status::Failed, FailureKind::Host, error),
                Either::Right(std::future::ready(Ok(()))),
            ),
        };
        let mut here = claim.here.map(|Here { recorded, ended }| {
            let _ = ended.send(view.clone());
            recorded
        });
        if let Some(listing) = listing {
            revision = Some(listing.await);
        }
        match revision {
            Some(_) => lines.close(),
            // Still known to nobody else: its lines may go inside its record.
            None => lines.close_unlisted(),
        }
        let published = match publisher {
            Some(publisher) => publisher.await.map_err(|e| {
                tracing::error!(workload = %id, error = %e, "the log publisher failed");
            }),
            // Never started: the lines go inside the record, or out now if
            // they came too fast for the publisher to have been started.
            None => Ok(self.publish_lines(Arc::clone(&lines)).await),
        };
        let published = match published {
            Ok(Ok(published)) => published,
            // Failed over: the record belongs to whoever fenced it.
            Ok(Err(super::logs::Fenced)) | Err(()) => return,
        };
        // What the cluster holds is what a reader of this record finds.
        view.summary.line_count = published.lines;
        let store = async {
            match revision {
                // Someone (a node that presumed this one lost) may have moved
                // it on: then it is theirs.
                Some(revision) => until_done("final record", id, || self.swap(&view, revision))
                    .await
                    .is_some(),
                None => {
                    let inline = published.inline.as_deref();
                    until_done("final record", id, || self.create_own(&view, inline)).await;
                    true
                }
            }
        };
        // The caller is answered from the cluster's record; this node's
        // copy commits meanwhile (in its own task), with other runs'.
        if let (true, Some(here)) = (store.await, here.take()) {
            let _ = here.send(view);
        }
        if let Err(e) = local.await {
            // Its lines and end are in the cluster, which is what is read.
            tracing::error!(workload = %id, error = %e, "this node could not store its own copy of a run");
        }
    }
}
