//! What a schedule is: a tenant's workload spec fired on a cron expression
//! read in a time zone, and the cron arithmetic that says which tick is due
//! and which comes next. Plain data and arithmetic; no I/O, no clock but
//! the one passed in.

use std::str::FromStr as _;

use chrono::{TimeZone as _, Utc};
use serde::{Deserialize, Serialize};

use crate::outbound::OutboundRule;
use crate::workload::{Limits, LogLevel, QueuedInput, WorkloadId, now_ms};

/// How many of a schedule's latest workloads its record names.
pub const LAST_WORKLOADS: usize = 10;

/// What a tick does while the previous firing's workload has not ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    /// Skips the tick (counted in `skipped`).
    #[default]
    Skip,
    /// Fires once the previous workload ended.
    Queue,
    /// Fires anyway.
    Allow,
}

/// The workload a schedule fires: a stored module and its spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledSpec {
    /// `sha256:<hex>` of the module.
    pub module: String,
    /// Its argv.
    pub args: Vec<String>,
    /// Its environment.
    pub env: Vec<(String, String)>,
    /// Its limits as asked (admission fills in the rest at each firing).
    pub limits: Limits,
    /// Its minimum SDK log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
    /// Hosts it may send HTTP requests to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<OutboundRule>,
    /// Its stdin and input.
    #[serde(default)]
    pub input: QueuedInput,
    /// How long each firing may wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
    /// When each firing's failed attempts run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::workload::RetryPolicy>,
}

/// A schedule as it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// Its name, unique within its tenant.
    pub name: String,
    /// Its tenant (`None` on a server without tenants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The cron expression (5 fields, or 6 with seconds first).
    pub cron: String,
    /// The IANA time zone the expression is read in (UTC if none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What each firing runs.
    pub spec: ScheduledSpec,
    /// What a tick does while the previous workload has not ended.
    pub overlap: Overlap,
    /// Paused: its ticks do nothing.
    #[serde(default)]
    pub paused: bool,
    /// When it was made (or last resumed), ms since the Unix epoch: ticks
    /// before it never fire.
    pub since_ms: i64,
    /// The last tick it fired (or skipped), ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_tick_ms: Option<i64>,
    /// Its latest workloads, newest first.
    #[serde(default)]
    pub last_workloads: Vec<WorkloadId>,
    /// Ticks skipped for `overlap: skip`.
    #[serde(default)]
    pub skipped: u64,
}

/// A schedule as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleView {
    /// The schedule.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// When it last fired (RFC 3339).
    pub last_fired_at: Option<String>,
    /// When it fires next (RFC 3339); none while paused.
    pub next_fire_at: Option<String>,
}

/// A cron expression in its time zone.
pub struct Clock {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Clock {
    /// `cron` read in `timezone` (UTC if none); why not, if it cannot be.
    pub fn of(cron: &str, timezone: Option<&str>) -> Result<Self, String> {
        let parser = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build();
        let cron = parser
            .parse(cron)
            .map_err(|e| format!("`{cron}` is not a cron expression: {e}"))?;
        let tz = match timezone {
            None => chrono_tz::UTC,
            Some(name) => chrono_tz::Tz::from_str(name)
                .map_err(|_| format!("`{name}` is not an IANA time zone"))?,
        };
        Ok(Self { cron, tz })
    }

    /// `ms` in the zone, down to its whole second (the cron arithmetic
    /// keeps any fraction, so ticks would land off the second).
    fn at(&self, ms: i64) -> Option<chrono::DateTime<chrono_tz::Tz>> {
        let second = ms.div_euclid(1000) * 1000;
        let utc = Utc.timestamp_millis_opt(second).single()?;
        Some(utc.with_timezone(&self.tz))
    }

    /// The first tick after `ms`.
    pub fn next_after(&self, ms: i64) -> Option<i64> {
        let next = self.cron.find_next_occurrence(&self.at(ms)?, false).ok()?;
        Some(next.timestamp_millis())
    }

    /// The last tick at or before `ms`.
    pub fn last_at(&self, ms: i64) -> Option<i64> {
        let last = self
            .cron
            .find_previous_occurrence(&self.at(ms)?, true)
            .ok()?;
        Some(last.timestamp_millis())
    }
}

impl Schedule {
    /// Its expression in its time zone.
    pub fn clock(&self) -> Result<Clock, String> {
        Clock::of(&self.cron, self.timezone.as_deref())
    }

    /// The tick due now, if one is: the latest at or before `now` that is
    /// after both its making and its last firing.
    pub fn due(&self, clock: &Clock, now: i64) -> Option<i64> {
        let tick = clock.last_at(now)?;
        let base = self.last_tick_ms.unwrap_or(i64::MIN).max(self.since_ms);
        (tick > base).then_some(tick)
    }

    /// As the API shows it now.
    pub fn view(self) -> ScheduleView {
        let next = match self.paused {
            true => None,
            false => self.clock().ok().and_then(|c| c.next_after(now_ms())),
        };
        ScheduleView {
            last_fired_at: self.last_tick_ms.map(crate::view::rfc3339),
            next_fire_at: next.map(crate::view::rfc3339),
            schedule: self,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_run_of_ticks_fires_once_and_a_new_schedule_does_not_catch_up() {
        let clock = Clock::of("*/2 * * * * *", None).unwrap();
        let schedule = |since_ms, last_tick_ms| Schedule {
            name: "s".into(),
            tenant: None,
            cron: "*/2 * * * * *".into(),
            timezone: None,
            spec: ScheduledSpec {
                module: "sha256:00".into(),
                args: Vec::new(),
                env: Vec::new(),
                limits: Limits::default(),
                log_level: None,
                allowed_hosts: Vec::new(),
                input: QueuedInput::default(),
                queue_timeout_ms: None,
                retry: None,
            },
            overlap: Overlap::Skip,
            paused: false,
            since_ms,
            last_tick_ms,
            last_workloads: Vec::new(),
            skipped: 0,
        };
        // Down from t=10 s to t=31 s: only the tick at 30 s is due.
        let down = schedule(0, Some(10_000));
        assert_eq!(down.due(&clock, 31_000), Some(30_000));
        // Made at 31 s: nothing before it fires; the tick at 32 s does.
        let new = schedule(31_000, None);
        assert_eq!(new.due(&clock, 31_500), None);
        assert_eq!(new.due(&clock, 32_000), Some(32_000));
        assert_eq!(clock.next_after(32_000), Some(34_000));
        // Between ticks, the last one is the one before, on its second.
        assert_eq!(new.due(&clock, 33_594), Some(32_000));
        assert_eq!(clock.next_after(33_594), Some(34_000));
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_what_is_wrong() {
        let e = Clock::of("61 * * * *", None).err().unwrap();
        assert!(e.contains("not a cron expression"), "{e}");
        let e = Clock::of("* * * * *", Some("Mars/Olympus")).err().unwrap();
        assert!(e.contains("not an IANA time zone"), "{e}");
        assert!(Clock::of("0 9 * * MON-FRI", Some("Europe/Berlin")).is_ok());
    }
}
