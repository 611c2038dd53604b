//! The order in which accepted work gets free slots: one FIFO lane per
//! tenant, and between tenants fair share — the next free slot goes to the
//! tenant with the fewest running workloads per unit of its weight, among
//! those under their `max_concurrent`. Also the queue deadlines
//! (`queue_timeout_ms`) and the depth figures `GET /v1/queue` shows.
//!
//! Plain data, no I/O and no clock of its own: a backend decides what a
//! slot is, when one is free and what starting a job means.

use std::collections::{BTreeSet, HashMap, VecDeque};

use crate::view::TenantQueue;
use crate::workload::WorkloadId;

/// A queued job and what the queue orders it by.
pub(crate) struct Queued<J> {
    /// Its workload.
    pub id: WorkloadId,
    /// Its tenant's lane (`None`: a server without tenants).
    pub tenant: Option<String>,
    /// When it was queued, ms since the Unix epoch.
    pub enqueued_ms: i64,
    /// When it fails with `queue_timeout` if it has not started.
    pub deadline_ms: Option<i64>,
    /// What the backend needs to start it.
    pub job: J,
}

/// What the queue asks of a tenant when it picks.
pub(crate) trait Shares {
    /// Its weight (at least 1).
    fn weight(&self, tenant: Option<&str>) -> u64;
    /// Whether it may start one more workload now (under its cap).
    fn may_start(&self, tenant: Option<&str>) -> bool;
}

/// Per-tenant FIFO lanes with fair share between them.
pub(crate) struct FairQueue<J> {
    lanes: HashMap<Option<String>, VecDeque<Queued<J>>>,
    /// Workloads running per tenant (started by whoever: the queue or a
    /// submission that found a free slot).
    running: HashMap<Option<String>, usize>,
    deadlines: BTreeSet<(i64, WorkloadId)>,
    len: usize,
}

impl<J> Default for FairQueue<J> {
    fn default() -> Self {
        Self {
            lanes: HashMap::new(),
            running: HashMap::new(),
            deadlines: BTreeSet::new(),
            len: 0,
        }
    }
}

impl<J> FairQueue<J> {
    /// How many jobs wait.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Adds a job at the end of its tenant's lane.
    pub fn push(&mut self, queued: Queued<J>) {
        if let Some(deadline) = queued.deadline_ms {
            self.deadlines.insert((deadline, queued.id));
        }
        self.len += 1;
        (self.lanes.entry(queued.tenant.clone()).or_default()).push_back(queued);
    }

    /// Puts a job picked but not started back at the head of its lane.
    pub fn put_back(&mut self, queued: Queued<J>) {
        if let Some(deadline) = queued.deadline_ms {
            self.deadlines.insert((deadline, queued.id));
        }
        self.len += 1;
        (self.lanes.entry(queued.tenant.clone()).or_default()).push_front(queued);
    }

    /// Whether a new submission of `tenant` must wait: its own lane has
    /// work (FIFO within a tenant), or another tenant that may start has.
    pub fn must_wait(&self, tenant: Option<&str>, shares: &impl Shares) -> bool {
        self.lanes.iter().any(|(t, lane)| {
            !lane.is_empty() && (t.as_deref() == tenant || shares.may_start(t.as_deref()))
        })
    }

    /// Takes the job whose tenant has the fewest running workloads per unit
    /// of weight, among tenants that may start; the oldest job breaks a tie.
    pub fn pick(&mut self, shares: &impl Shares) -> Option<Queued<J>> {
        let mut best: Option<(&Option<String>, u64, u64, WorkloadId)> = None;
        for (tenant, lane) in &self.lanes {
            let Some(head) = lane.front() else { continue };
            if !shares.may_start(tenant.as_deref()) {
                continue;
            }
            let running = self.running.get(tenant).copied().unwrap_or(0) as u64;
            let weight = shares.weight(tenant.as_deref()).max(1);
            let better = match best {
                None => true,
                // running / weight < best_running / best_weight, without division.
                Some((_, r, w, id)) => match (running * w).cmp(&(r * weight)) {
                    std::cmp::Ordering::Less => true,
                    std::cmp::Ordering::Equal => head.id < id,
                    std::cmp::Ordering::Greater => false,
                },
            };
            if better {
                best = Some((tenant, running, weight, head.id));
            }
        }
        let tenant = best?.0.clone();
        let lane = self.lanes.get_mut(&tenant)?;
        let job = lane.pop_front()?;
        if lane.is_empty() {
            self.lanes.remove(&tenant);
        }
        self.taken(&job);
        Some(job)
    }

    /// Takes job `id` out (killed while it waited).
    pub fn remove(&mut self, id: WorkloadId) -> Option<Queued<J>> {
        let (tenant, at) = self
            .lanes
            .iter()
            .find_map(|(t, lane)| Some((t.clone(), lane.iter().position(|q| q.id == id)?)))?;
        let lane = self.lanes.get_mut(&tenant)?;
        let job = lane.remove(at)?;
        if lane.is_empty() {
            self.lanes.remove(&tenant);
        }
        self.taken(&job);
        Some(job)
    }

    fn taken(&mut self, job: &Queued<J>) {
        self.len -= 1;
        if let Some(deadline) = job.deadline_ms {
            self.deadlines.remove(&(deadline, job.id));
        }
    }

    /// The earliest queue deadline, if any job has one.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Takes out every job whose deadline is at or before `now_ms`.
    pub fn expired(&mut self, now_ms: i64) -> Vec<Queued<J>> {
        let due = due(&self.deadlines, now_ms);
        due.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Counts a workload of `tenant` as running.
    pub fn started(&mut self, tenant: Option<&str>) {
        *self.running.entry(tenant.map(str::to_owned)).or_default() += 1;
    }

    /// Counts a workload of `tenant` as no longer running.
    pub fn ended(&mut self, tenant: Option<&str>) {
        let key = tenant.map(str::to_owned);
        if let Some(n) = self.running.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.running.remove(&key);
            }
        }
    }

    /// Depth, running and oldest wait per tenant (those with either), in
    /// tenant order.
    pub fn depth(&self, now_ms: i64) -> Vec<TenantQueue> {
        let mut tenants: Vec<&Option<String>> = self.lanes.keys().collect();
        tenants.extend(self.running.keys().filter(|t| !self.lanes.contains_key(*t)));
        tenants.sort();
        tenants
            .into_iter()
            .map(|t| {
                let lane = self.lanes.get(t);
                let oldest = lane.and_then(|l| l.iter().map(|q| q.enqueued_ms).min());
                TenantQueue {
                    tenant: t.clone(),
                    queued: lane.map_or(0, |l| l.len() as u64),
                    running: self.running.get(t).copied().unwrap_or(0) as u64,
                    oldest_queued_at: oldest.map(crate::view::rfc3339),
                    oldest_wait_ms: oldest.map(|at| (now_ms - at).max(0) as u64),
                }
            })
            .collect()
    }
}

/// The workloads whose time in `times` is at or before `now_ms`, earliest first.
fn due(times: &BTreeSet<(i64, WorkloadId)>, now_ms: i64) -> Vec<WorkloadId> {
    (times.iter())
        .take_while(|(at, _)| *at <= now_ms)
        .map(|(_, id)| *id)
        .collect()
}

/// Retries waiting out their backoff before they join the queue: they
/// hold no place in it (an accepted retry is never refused), and each
/// joins its tenant's lane at the back once its time has come.
pub(crate) struct Backoffs<J> {
    resting: HashMap<WorkloadId, (i64, Queued<J>)>,
    due: BTreeSet<(i64, WorkloadId)>,
}

impl<J> Default for Backoffs<J> {
    fn default() -> Self {
        Self {
            resting: HashMap::new(),
            due: BTreeSet::new(),
        }
    }
}

impl<J> Backoffs<J> {
    /// How many wait.
    pub fn len(&self) -> usize {
        self.resting.len()
    }

    /// `queued` rests until `at`, ms since the Unix epoch.
    pub fn rest(&mut self, queued: Queued<J>, at: i64) {
        self.due.insert((at, queued.id));
        self.resting.insert(queued.id, (at, queued));
    }

    /// When the next one's time comes.
    pub fn next_due(&self) -> Option<i64> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Takes out every one whose time has come, earliest first.
    pub fn ready(&mut self, now_ms: i64) -> Vec<Queued<J>> {
        let due = due(&self.due, now_ms);
        due.into_iter().filter_map(|id| self.remove(id)).collect()
    }

    /// Takes `id` out (killed during its backoff).
    pub fn remove(&mut self, id: WorkloadId) -> Option<Queued<J>> {
        let (at, queued) = self.resting.remove(&id)?;
        self.due.remove(&(at, id));
        Some(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights and caps by tenant name.
    struct Table(
        Vec<(&'static str, u64, Option<usize>)>,
        HashMap<String, usize>,
    );

    impl Shares for Table {
        fn weight(&self, tenant: Option<&str>) -> u64 {
            (self.0.iter())
                .find(|t| Some(t.0) == tenant)
                .map_or(1, |t| t.1)
        }
        fn may_start(&self, tenant: Option<&str>) -> bool {
            let cap = (self.0.iter())
                .find(|t| Some(t.0) == tenant)
                .and_then(|t| t.2);
            let running = tenant.and_then(|t| self.1.get(t)).copied().unwrap_or(0);
            cap.is_none_or(|cap| running < cap)
        }
    }

    fn job(tenant: &str) -> Queued<()> {
        Queued {
            id: WorkloadId::new(),
            tenant: Some(tenant.to_owned()),
            enqueued_ms: 0,
            deadline_ms: None,
            job: (),
        }
    }

    #[test]
    fn a_quiet_tenants_one_job_goes_before_a_noisy_tenants_backlog() {
        let shares = Table(vec![], HashMap::new());
        let mut queue = FairQueue::default();
        for _ in 0..10_000 {
            queue.push(job("noisy"));
        }
        // Four slots, all taken by the noisy tenant's oldest jobs.
        for _ in 0..4 {
            let picked = queue.pick(&shares).unwrap();
            queue.started(picked.tenant.as_deref());
        }
        let quiet = job("quiet");
        let quiet_id = quiet.id;
        queue.push(quiet);
        // One slot frees: it goes to the quiet tenant.
        queue.ended(Some("noisy"));
        assert_eq!(queue.pick(&shares).unwrap().id, quiet_id);
        assert_eq!(queue.len(), 9_996);
    }

    #[test]
    fn weights_share_slots_in_proportion_and_fifo_holds_within_a_tenant() {
        let shares = Table(vec![("a", 3, None), ("b", 1, None)], HashMap::new());
        let mut queue = FairQueue::default();
        let a: Vec<_> = (0..100).map(|_| job("a")).collect();
        let a_ids: Vec<_> = a.iter().map(|q| q.id).collect();
        for q in a {
            queue.push(q);
        }
        for _ in 0..100 {
            queue.push(job("b"));
        }
        let mut picked_a = Vec::new();
        let mut counts = HashMap::new();
        for _ in 0..8 {
            let picked = queue.pick(&shares).unwrap();
            queue.started(picked.tenant.as_deref());
            *counts.entry(picked.tenant.clone().unwrap()).or_insert(0) += 1;
            if picked.tenant.as_deref() == Some("a") {
                picked_a.push(picked.id);
            }
        }
        assert_eq!(counts["a"], 6, "{counts:?}");
        assert_eq!(counts["b"], 2, "{counts:?}");
        assert_eq!(picked_a, a_ids[..6], "a's jobs start in the order queued");
    }

    #[test]
    fn a_tenant_at_its_cap_waits_and_others_go_past_it() {
        let running = HashMap::from([("capped".to_owned(), 2)]);
        let shares = Table(vec![("capped", 1, Some(2))], running);
        let mut queue = FairQueue::default();
        queue.push(job("capped"));
        let other = job("other");
        let other_id = other.id;
        queue.push(other);
        assert!(
            queue.must_wait(Some("third"), &shares),
            "other's job goes first"
        );
        assert_eq!(queue.pick(&shares).unwrap().id, other_id);
        assert!(
            queue.pick(&shares).is_none(),
            "the capped tenant's job waits"
        );
        assert!(queue.must_wait(Some("capped"), &shares), "FIFO in its lane");
        assert!(!queue.must_wait(Some("third"), &shares));
    }

    #[test]
    fn deadlines_expire_in_order_and_removal_forgets_them() {
        let mut queue = FairQueue::default();
        let mut early = job("a");
        early.deadline_ms = Some(10);
        let mut late = job("a");
        late.deadline_ms = Some(20);
        let (early_id, late_id) = (early.id, late.id);
        queue.push(early);
        queue.push(late);
        assert_eq!(queue.next_deadline(), Some(10));
        let expired: Vec<_> = queue.expired(15).into_iter().map(|q| q.id).collect();
        assert_eq!(expired, vec![early_id]);
        assert!(queue.remove(late_id).is_some());
        assert_eq!(queue.next_deadline(), None);
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn backoffs_release_in_time_order_and_a_kill_takes_one_out() {
        let mut rest = Backoffs::default();
        let (a, b, c) = (job("t"), job("t"), job("u"));
        let (a_id, b_id, c_id) = (a.id, b.id, c.id);
        rest.rest(a, 300);
        rest.rest(b, 100);
        rest.rest(c, 200);
        assert_eq!(rest.next_due(), Some(100));
        assert!(rest.remove(c_id).is_some());
        assert!(rest.ready(99).is_empty());
        let ready: Vec<_> = rest.ready(300).into_iter().map(|q| q.id).collect();
        assert_eq!(ready, vec![b_id, a_id]);
        assert_eq!((rest.len(), rest.next_due()), (0, None));
    }
}
