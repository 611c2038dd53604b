//! The threads guests run on, apart from the threads that serve requests.
//!
//! A guest's run is a tokio task that computes for up to an epoch tick at a
//! time (its record is created and ended on the server's own threads).
//! On the same few workers as the API, every request of every other tenant
//! (parse, store round trips, its own guest, the response) would queue behind
//! each busy guest's tick, hop after hop. Here each running guest gets a
//! worker of its own — one per slot — so the operating system's scheduler
//! shares the cores between them, preempting by fairness, and the API's
//! mostly idle threads are scheduled as soon as they wake. On Linux the
//! guest threads also run at a lower priority (niceness [`GUEST_NICENESS`]),
//! so the threads that answer requests and commit lines preempt guest
//! computation rather than wait for a share of the cores; with nothing else
//! to run, a guest still gets a whole core. Owns the runtime and nothing
//! else: which task runs where is the runner's choice.

use anyhow::Context as _;

/// A runtime with one worker per workload slot.
pub struct GuestThreads {
    /// Taken only on drop.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

/// How much lower guest threads' priority is than the server's (a Linux
/// niceness: each step is about 1.25x less CPU when cores are contended).
pub const GUEST_NICENESS: i32 = 10;

/// Most worker threads, however many slots there are: beyond this, guests
/// share workers (the limit of slots is still enforced by the runner).
const MAX_THREADS: usize = 512;

impl GuestThreads {
    /// Starts `slots` workers (at least 2, at most [`MAX_THREADS`]).
    pub fn start(slots: usize) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(slots.clamp(2, MAX_THREADS))
            .thread_name("vulcan-guest")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()
            .context("failed to start the guest threads")?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Where guests are spawned.
    pub fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }
}

/// Makes the calling thread [`GUEST_NICENESS`] nicer than the process.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{getpriority_process, setpriority_process};
        // On Linux these act on the one thread whose id is given.
        let me = Some(rustix::thread::gettid());
        let lowered = getpriority_process(me)
            .and_then(|now| setpriority_process(me, (now + GUEST_NICENESS).min(19)));
        if let Err(e) = lowered {
            tracing::warn!(error = %e, "could not lower a guest thread's priority");
        }
    }
}

impl Drop for GuestThreads {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its workers stop, which tokio
        // forbids inside another runtime; by now every guest has ended or
        // been abandoned by the node's shutdown.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn guests_run_on_named_threads_at_a_lower_priority() {
        use rustix::process::getpriority_process;
        let process = getpriority_process(None).unwrap();
        let guests = GuestThreads::start(2).unwrap();
        let (name, niceness) = guests
            .handle()
            .block_on(guests.handle().spawn(async {
                let me = Some(rustix::thread::gettid());
                let name = std::thread::current().name().map(str::to_owned);
                (name, getpriority_process(me).unwrap())
            }))
            .unwrap();
        assert_eq!(name.as_deref(), Some("vulcan-guest"));
        assert_eq!(niceness, (process + GUEST_NICENESS).min(19));
    }
}
