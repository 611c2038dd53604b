//! Schedules: a tenant's workload spec fired on a cron expression. Written
//! once: the definitions are kept by the backend (a SQLite file of their
//! own on one node, a KV bucket in a cluster); every node runs the same
//! scheduler, and a firing is an ordinary submission whose idempotency key
//! names the schedule and the tick (`schedule:<name>:<tick ms>`), so each
//! tick makes one workload however many nodes fire it.
//!
//! A tick missed while no node ran fires once when one runs again (the
//! latest missed tick only: at most one catch-up run per schedule). A
//! resumed schedule does not catch up. `overlap` says what a tick does
//! while the previous firing's workload still waits or runs: `skip` it,
//! `queue` it (it fires once that one ended), or `allow` it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Backend, Caller, ModuleRef, Service, ServiceError, Submission};
use crate::schedule::{Clock, LAST_WORKLOADS, Overlap, Schedule, ScheduleView, ScheduledSpec};
use crate::workload::{QueuedInput, WorkloadSpec, now_ms};

/// A schedule to make, as a client asks for it.
pub struct NewSchedule {
    /// Its name.
    pub name: String,
    /// Its cron expression.
    pub cron: String,
    /// Its time zone.
    pub timezone: Option<String>,
    /// What it runs (the module by hash).
    pub submission: Submission,
    /// What a tick does while the previous workload has not ended.
    pub overlap: Overlap,
}

/// A schedule's spec to and from the submission each firing makes.
trait Fires: Sized {
    fn of(submission: &Submission) -> Result<Self, ServiceError>;
    fn submission(&self, schedule: &str, key: String) -> Result<Submission, ServiceError>;
}

impl Fires for ScheduledSpec {
    fn of(submission: &Submission) -> Result<Self, ServiceError> {
        let ModuleRef::Hash(module) = &submission.module else {
            return Err(ServiceError::BadRequest(
                "a schedule runs a stored module: give `module` (upload it first)".into(),
            ));
        };
        let spec = &submission.spec;
        Ok(Self {
            module: module.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            limits: spec.limits.clone(),
            log_level: spec.log_level,
            allowed_hosts: spec.allowed_hosts.clone(),
            input: QueuedInput::of(spec, None),
            queue_timeout_ms: submission.queue_timeout_ms,
            retry: spec.retry.clone(),
        })
    }

    fn submission(&self, schedule: &str, key: String) -> Result<Submission, ServiceError> {
        let (stdin, input) = (self.input.bytes())
            .map_err(|e| ServiceError::Internal(e.context("corrupt schedule")))?;
        let spec = WorkloadSpec {
            args: self.args.clone(),
            env: self.env.clone(),
            stdin,
            preopens: Vec::new(),
            limits: self.limits.clone(),
            input,
            log_level: self.log_level,
            allowed_hosts: self.allowed_hosts.clone(),
            tenant: None,
            schedule: Some(schedule.to_owned()),
            retry: self.retry.clone(),
        };
        Ok(Submission {
            module: ModuleRef::Hash(self.module.clone()),
            spec,
            queue_timeout_ms: self.queue_timeout_ms,
            idempotency_key: Some(key),
        })
    }
}

/// Checks a schedule's name: 1 to 64 letters, digits, `-`, `_` or `.`.
fn check_name(name: &str) -> Result<(), ServiceError> {
    let fits = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    match fits {
        true => Ok(()),
        false => Err(ServiceError::BadRequest(
            "a schedule's name is 1 to 64 letters, digits, `-`, `_` or `.`".into(),
        )),
    }
}

fn unknown(name: &str) -> ServiceError {
    ServiceError::NotFound(format!("schedule {name} not found"))
}

impl Service {
    /// Makes a schedule for `caller`: 201-worthy view, 409 if the name is
    /// taken, 400 for a bad expression, time zone or spec.
    pub async fn create_schedule(
        &self,
        caller: &Caller,
        new: NewSchedule,
    ) -> Result<ScheduleView, ServiceError> {
        check_name(&new.name)?;
        let clock =
            Clock::of(&new.cron, new.timezone.as_deref()).map_err(ServiceError::BadRequest)?;
        if clock.next_after(now_ms()).is_none() {
            return Err(ServiceError::BadRequest(format!(
                "`{}` never fires",
                new.cron
            )));
        }
        let spec = ScheduledSpec::of(&new.submission)?;
        if new.submission.idempotency_key.is_some() {
            return Err(ServiceError::BadRequest(
                "a schedule's firings have idempotency keys of their own".into(),
            ));
        }
        // What each firing would be refused for is refused now.
        on_backend!(self, b => b.check_spec(&new.submission.spec))?;
        let mut check = new.submission.spec.clone();
        let outbound = self.inner.node.outbound_policy();
        on_backend!(self, b => self.inner.admission.admit(caller, &mut check, outbound, |t| {
            b.stored_log_bytes(t)
        }))?;
        if let Some(tenant) = caller.scope() {
            on_backend!(self, b => b.check_owned(tenant, &spec.module).await)?;
        }
        let schedule = Schedule {
            name: new.name,
            tenant: caller.owner(),
            cron: new.cron,
            timezone: new.timezone,
            spec,
            overlap: new.overlap,
            paused: false,
            since_ms: now_ms(),
            last_tick_ms: None,
            last_workloads: Vec::new(),
            skipped: 0,
        };
        on_backend!(self, b => b.create_schedule(&schedule).await)?;
        self.inner.schedules_changed.notify_one();
        Ok(schedule.view())
    }

    /// The schedules `caller` sees (an admin: everyone's), by tenant and name.
    pub async fn schedules(&self, caller: &Caller) -> Result<Vec<ScheduleView>, ServiceError> {
        let mut all = on_backend!(self, b => b.schedules().await)?;
        if let Some(own) = caller.scope() {
            all.retain(|s| s.tenant.as_deref() == Some(own));
        }
        all.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
        Ok(all.into_iter().map(Schedule::view).collect())
    }

    /// `caller`'s schedule `name`.
    pub async fn schedule(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<ScheduleView, ServiceError> {
        Ok(self.own_schedule(caller, name).await?.view())
    }

    async fn own_schedule(&self, caller: &Caller, name: &str) -> Result<Schedule, ServiceError> {
        check_name(name).map_err(|_| unknown(name))?;
        let owner = caller.owner();
        on_backend!(self, b => b.schedule(owner.as_deref(), name).await)?
            .ok_or_else(|| unknown(name))
    }

    /// Pauses (or resumes) `caller`'s schedule `name`; a resumed one fires
    /// from its next tick on, without catching up.
    pub async fn pause_schedule(
        &self,
        caller: &Caller,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleView, ServiceError> {
        let mut schedule = self.own_schedule(caller, name).await?;
        if schedule.paused && !paused {
            schedule.since_ms = now_ms();
        }
        schedule.paused = paused;
        on_backend!(self, b => b.put_schedule(&schedule).await)?;
        self.inner.schedules_changed.notify_one();
        Ok(schedule.view())
    }

    /// Deletes `caller`'s schedule `name` (its workloads stay).
    pub async fn delete_schedule(&self, caller: &Caller, name: &str) -> Result<(), ServiceError> {
        let schedule = self.own_schedule(caller, name).await?;
        let tenant = schedule.tenant.as_deref();
        on_backend!(self, b => b.delete_schedule(tenant, name).await)?;
        self.inner.schedules_changed.notify_one();
        Ok(())
    }

    /// Fires every schedule at its ticks, until the task is dropped.
    pub(super) async fn run_schedules(self) {
        // Ticks this node has fired, so a tick is not fired twice here
        // while its firing is being recorded.
        let mut fired: HashMap<(Option<String>, String), i64> = HashMap::new();
        loop {
            let now = now_ms();
            let mut wake = now + 1000;
            match on_backend!(self, b => b.schedules().await) {
                Ok(all) => {
                    for schedule in all.into_iter().filter(|s| !s.paused) {
                        let Ok(clock) = schedule.clock() else {
                            continue;
                        };
                        if let Some(next) = clock.next_after(now) {
                            wake = wake.min(next);
                        }
                        let Some(tick) = schedule.due(&clock, now) else {
                            continue;
                        };
                        let at = (schedule.tenant.clone(), schedule.name.clone());
                        if fired.get(&at) >= Some(&tick) {
                            continue;
                        }
                        if self.fire(schedule, tick).await {
                            fired.insert(at, tick);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read the schedules"),
            }
            let wait = Duration::from_millis((wake - now_ms()).max(0) as u64);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.schedules_changed.notified() => {}
            }
        }
    }

    /// Fires `schedule`'s `tick` (or skips it, or leaves it for later while
    /// its previous workload has not ended); true once the tick is done with.
    async fn fire(&self, mut schedule: Schedule, tick: i64) -> bool {
        let name = schedule.name.clone();
        let caller = match &schedule.tenant {
            None => Caller(None),
            Some(t) => match self.tenants().named(t) {
                Some(t) => Caller(Some(Arc::clone(t))),
                None => {
                    tracing::warn!(schedule = %name, tenant = %t, "the schedule's tenant is gone; not fired");
                    return true;
                }
            },
        };
        if schedule.overlap != Overlap::Allow
            && let Some(last) = schedule.last_workloads.first()
        {
            let previous = on_backend!(self, b => b.record(*last).await);
            if previous.is_ok_and(|v| !v.summary.status.is_terminal()) {
                if schedule.overlap == Overlap::Queue {
                    return false;
                }
                schedule.skipped += 1;
                schedule.last_tick_ms = Some(tick);
                let _ = on_backend!(self, b => b.put_schedule(&schedule).await);
                return true;
            }
        }
        let key = format!("schedule:{name}:{tick}");
        let submission = match schedule.spec.submission(&name, key) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(schedule = %name, error = %e, "cannot fire");
                return true;
            }
        };
        let id = match self.submit(&caller, submission).await {
            Ok(id) => id,
            Err(e) => {
                // Refused (a quota, a full queue, a deleted module): the
                // tick is over; the next one tries again.
                tracing::warn!(schedule = %name, error = %e, "a schedule's firing was refused");
                schedule.last_tick_ms = Some(tick);
                let _ = on_backend!(self, b => b.put_schedule(&schedule).await);
                return true;
            }
        };
        // Recorded on the definition as it is now (paused or changed meanwhile).
        let tenant = schedule.tenant.clone();
        let current = on_backend!(self, b => b.schedule(tenant.as_deref(), &name).await);
        if let Ok(Some(mut current)) = current {
            current.last_tick_ms = current.last_tick_ms.max(Some(tick));
            if !current.last_workloads.contains(&id) {
                current.last_workloads.insert(0, id);
                current.last_workloads.truncate(LAST_WORKLOADS);
            }
            if let Err(e) = on_backend!(self, b => b.put_schedule(&current).await) {
                tracing::warn!(schedule = %name, error = %e, "cannot record a firing");
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        assert!(check_name("nightly-report.v2").is_ok());
        assert!(check_name("has space").is_err() && check_name("").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }
}
