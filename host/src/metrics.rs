//! Prometheus metrics: what the server exposes at `/metrics`.
//!
//! Owns the metric families; stages record into them and the API renders them.
//! Nothing here decides anything.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::workload::Status;

/// Label of the finished-workloads counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// Final status.
    pub status: String,
}

/// One interval of the server's activity, as the console's health chart draws it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sample {
    /// End of the interval, milliseconds since the Unix epoch.
    pub t: i64,
    /// Workloads executing at its end.
    pub running: i64,
    /// Workloads that ended during it.
    pub workloads: u64,
    /// Log lines committed during it.
    pub lines: u64,
}

/// The last [`HISTORY`] samples, oldest first, and the totals the next one
/// is counted from.
#[derive(Default)]
struct History {
    samples: std::collections::VecDeque<Sample>,
    totals: Option<(u64, u64)>,
}

/// How many samples the server keeps (ten minutes at one a second).
pub const HISTORY: usize = 600;

/// Every metric Vulcan exports.
pub struct Metrics {
    registry: std::sync::Mutex<Registry>,
    finished: Family<StatusLabel, Counter>,
    /// Workloads executing now.
    pub running: Gauge,
    duration: Histogram,
    /// Log records written by all workloads.
    pub log_lines: Counter,
    /// Compiled-module cache hits (memory).
    pub cache_hits: Counter,
    /// Compiled-module cache misses (loaded from disk or compiled).
    pub cache_misses: Counter,
    /// Modules compiled from bytes.
    pub compiles: Counter,
    /// Clients following a workload's log over SSE now.
    pub followers: Gauge,
    /// Workloads with an open live channel (set from the broker when rendered).
    pub live_channels: Gauge,
    /// Log lines that could not be stored (set from the store when rendered).
    pub lost_lines: Gauge,
    /// Store transactions retried because the database was busy (likewise).
    pub busy_retries: Gauge,
    /// Store transactions committed (likewise): beside the workload count it
    /// shows how many lifecycle writes share a commit.
    pub commits: Gauge,
    /// The server's own log writes dropped because stderr failed (likewise).
    pub dropped_diagnostics: Gauge,
    /// 1 while the store refuses log lines because its disk is full (likewise).
    pub storage_full: Gauge,
    /// Workloads waiting in the queue for a slot.
    pub queued: Gauge,
    /// How long started workloads waited in the queue.
    pub queue_wait: Histogram,
    /// Failed attempts that were queued to run again.
    pub retries: Counter,
    /// Workloads ended since start, of any status.
    finished_total: std::sync::atomic::AtomicU64,
    history: std::sync::Mutex<History>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("vulcan");
        let finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "workloads_finished",
            "Workloads that ended, by final status",
            finished.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.0005, 4.0, 12));
        registry.register(
            "workload_duration_seconds",
            "Wall-clock run time of finished workloads",
            duration.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(0.001, 4.0, 12));
        registry.register(
            "queue_wait_seconds",
            "How long workloads waited in the queue before they started (those that queued)",
            queue_wait.clone(),
        );
        let counters = [
            ("log_lines", "Log records written by workloads"),
            ("module_cache_hits", "Compiled modules served from memory"),
            (
                "module_cache_misses",
                "Compiled modules not in memory (loaded from a disk artifact or compiled)",
            ),
            ("module_compiles", "Modules compiled from bytes"),
            (
                "workload_retries",
                "Failed attempts queued to run again by their retry policy",
            ),
        ]
        .map(|(name, help)| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        });
        let gauges = [
            ("workloads_running", "Workloads executing now"),
            ("log_followers", "Clients following a workload's log over SSE"),
            ("live_log_channels", "Workloads whose lines are delivered live now (pending or running)"),
            ("lost_log_lines", "Log lines that could not be stored since start (their workloads failed)"),
            ("store_busy_retries", "Store transactions retried since start because another connection held the database"),
            ("store_commits", "Store transactions committed since start (lines and lifecycle writes of many workloads share one)"),
            ("diagnostics_dropped_writes", "Lines of the server's own log dropped since start because stderr could not be written"),
            ("store_full", "1 while the store's disk is full: log lines are refused, terminal statuses still written"),
            ("workloads_queued", "Workloads accepted and waiting in the queue for a slot"),
        ]
        .map(|(name, help)| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        });
        let [log_lines, cache_hits, cache_misses, compiles, retries] = counters;
        let [
            running,
            followers,
            live_channels,
            lost_lines,
            busy_retries,
            commits,
            dropped_diagnostics,
            storage_full,
            queued,
        ] = gauges;
        Self {
            registry: std::sync::Mutex::new(registry),
            finished,
            running,
            duration,
            log_lines,
            cache_hits,
            cache_misses,
            compiles,
            followers,
            live_channels,
            lost_lines,
            busy_retries,
            commits,
            dropped_diagnostics,
            storage_full,
            queued,
            queue_wait,
            retries,
            finished_total: Default::default(),
            history: Default::default(),
        }
    }
}

impl Metrics {
    /// Records a finished workload.
    pub fn workload_finished(&self, status: Status, duration_ms: u64, lines: u64) {
        self.finished
            .get_or_create(&StatusLabel {
                status: status.as_str().to_owned(),
            })
            .inc();
        self.duration.observe(duration_ms as f64 / 1000.0);
        self.log_lines.inc_by(lines);
        (self.finished_total).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Closes an interval at `t` (ms) given the lines committed so far: what
    /// ended and what was written since the previous call.
    pub fn sample(&self, t: i64, committed_lines: u64) {
        let finished = self
            .finished_total
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((was_finished, was_lines)) = history.totals {
            let sample = Sample {
                t,
                running: self.running.get(),
                workloads: finished.saturating_sub(was_finished),
                lines: committed_lines.saturating_sub(was_lines),
            };
            if history.samples.len() == HISTORY {
                history.samples.pop_front();
            }
            history.samples.push_back(sample);
        }
        history.totals = Some((finished, committed_lines));
    }

    /// The kept samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let history = self.history.lock().unwrap_or_else(|p| p.into_inner());
        history.samples.iter().copied().collect()
    }

    /// Adds figures a part registers itself (a cluster member's
    /// `vulcan_cluster_*`): the metrics know no part above them.
    pub fn register_more(&self, register: impl FnOnce(&mut Registry)) {
        register(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_count_each_interval_and_keep_the_last_ten_minutes() {
        let m = Metrics::default();
        m.sample(0, 100); // the first call only sets the starting totals
        assert!(m.samples().is_empty());
        m.workload_finished(Status::Completed, 5, 3);
        m.workload_finished(Status::Failed, 5, 0);
        m.running.set(4);
        m.sample(1000, 130);
        let s = m.samples();
        assert_eq!(s.len(), 1);
        assert_eq!(
            (s[0].t, s[0].running, s[0].workloads, s[0].lines),
            (1000, 4, 2, 30)
        );
        for t in 2..(HISTORY as i64 + 10) {
            m.sample(t * 1000, 130);
        }
        let s = m.samples();
        assert_eq!(s.len(), HISTORY);
        assert_eq!(s.last().unwrap().t, (HISTORY as i64 + 9) * 1000);
        assert!(s.iter().all(|s| s.workloads == 0 && s.lines == 0));
    }
}
