//! Retry policies: a client's policy checked into a [`RetryPolicy`], which
//! failed attempts run again after what backoff, and an attempt as its
//! record's history keeps it. Owns only the checks and the arithmetic (the
//! types are the workload model's); queueing the next attempt is the
//! service's, recording it the store's.

use serde::Deserialize;

use crate::workload::{Attempt, Completion, FailureKind, RetryPolicy};

/// Most attempts a policy may ask for (the first run included).
pub const MAX_ATTEMPTS: u32 = 20;

/// Longest backoff a policy may ask for: one day.
pub const MAX_BACKOFF_MS: u64 = 24 * 60 * 60 * 1000;

/// Backoff before the second attempt when the spec names none.
pub const DEFAULT_BACKOFF_MS: u64 = 1_000;

/// Longest backoff when the spec names none: one hour.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 60 * 60 * 1000;

/// An earlier attempt's error is kept up to this many bytes.
const ERROR_KEPT: usize = 1024;

/// Retried when a policy names no kinds: what a transient fault may cause.
/// Limits (memory, fuel, output) fail the same way again, and a lost node
/// may have left effects behind, so those are retried only when named.
pub const DEFAULT_ON: [FailureKind; 5] = [
    FailureKind::Exit,
    FailureKind::Trap,
    FailureKind::Timeout,
    FailureKind::ReturnedError,
    FailureKind::Host,
];

/// A retry policy as a client writes it, before it is checked.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryRequest {
    /// Attempts in all, the first included.
    pub max_attempts: Option<i64>,
    /// Backoff before the second attempt.
    pub backoff_ms: Option<i64>,
    /// Cap on the backoff.
    pub max_backoff_ms: Option<i64>,
    /// Failure kinds to retry, by name.
    pub on: Option<Vec<String>>,
}

impl RetryRequest {
    /// The policy it asks for, or why it cannot be one (a message for a 400).
    pub fn check(self) -> Result<RetryPolicy, String> {
        let max_attempts = self
            .max_attempts
            .ok_or("retry.max_attempts is required (attempts in all, the first included)")?;
        if !(1..=i64::from(MAX_ATTEMPTS)).contains(&max_attempts) {
            return Err(format!(
                "retry.max_attempts must be between 1 and {MAX_ATTEMPTS}, got {max_attempts}"
            ));
        }
        let ms = |field: &str, value: i64| -> Result<u64, String> {
            match u64::try_from(value) {
                Ok(v) if v <= MAX_BACKOFF_MS => Ok(v),
                Ok(_) => Err(format!(
                    "retry.{field} must be at most {MAX_BACKOFF_MS} (one day), got {value}"
                )),
                Err(_) => Err(format!("retry.{field} must be 0 or more, got {value}")),
            }
        };
        let backoff_ms = ms(
            "backoff_ms",
            self.backoff_ms.unwrap_or(DEFAULT_BACKOFF_MS as i64),
        )?;
        let max_backoff_ms = match self.max_backoff_ms {
            Some(v) => ms("max_backoff_ms", v)?,
            None => DEFAULT_MAX_BACKOFF_MS.max(backoff_ms),
        };
        if max_backoff_ms < backoff_ms {
            return Err(format!(
                "retry.max_backoff_ms ({max_backoff_ms}) is less than retry.backoff_ms ({backoff_ms})"
            ));
        }
        let on = match self.on {
            None => DEFAULT_ON.to_vec(),
            Some(names) if names.is_empty() => {
                return Err("retry.on is empty: name the failure kinds to retry, or leave it out for the default".into());
            }
            Some(names) => {
                let mut on = Vec::new();
                for name in names {
                    let kind = name.parse::<FailureKind>().ok().filter(|k| k.retryable());
                    let Some(kind) = kind else {
                        let allowed: Vec<_> = FailureKind::ALL
                            .into_iter()
                            .filter(|k| k.retryable())
                            .map(FailureKind::as_str)
                            .collect();
                        return Err(format!(
                            "retry.on: `{name}` is not a failure kind that can be retried \
                             (one of {})",
                            allowed.join(", ")
                        ));
                    };
                    if !on.contains(&kind) {
                        on.push(kind);
                    }
                }
                on
            }
        };
        Ok(RetryPolicy {
            max_attempts: max_attempts as u32,
            backoff_ms,
            max_backoff_ms,
            on,
        })
    }
}

impl RetryPolicy {
    /// The backoff before the attempt after `attempt` (1-based), if that
    /// attempt ended in a way this policy retries and attempts are left.
    /// Exponential with "equal jitter": half the capped delay, plus a
    /// random share of the other half, so retries of many workloads that
    /// failed together do not arrive together.
    pub fn backoff_after(&self, attempt: u32, ended: &Completion) -> Option<u64> {
        let failure = ended.failure?;
        if attempt >= self.max_attempts || !failure.retryable() || !self.on.contains(&failure) {
            return None;
        }
        let doubled = self
            .backoff_ms
            .saturating_mul(1u64 << (attempt - 1).min(40));
        let capped = doubled.min(self.max_backoff_ms);
        let half = capped / 2;
        let mut noise = [0u8; 8];
        // Without randomness the delay is simply the capped one.
        let jitter = match getrandom::fill(&mut noise) {
            Ok(()) => u64::from_le_bytes(noise) % (capped - half + 1),
            Err(_) => capped - half,
        };
        Some(half + jitter)
    }
}

impl Attempt {
    /// Attempt `attempt`, which started at `started_at`, its first line
    /// `first_seq`, as `ended` it; the next may start at `retry_at`.
    pub fn of(
        attempt: u32,
        started_at: Option<i64>,
        first_seq: u64,
        ended: &Completion,
        now: i64,
        retry_at: i64,
    ) -> Self {
        let error = ended.error.as_ref().map(|e| match e.len() > ERROR_KEPT {
            true => {
                let mut cut = ERROR_KEPT;
                while !e.is_char_boundary(cut) {
                    cut -= 1;
                }
                format!("{}…", &e[..cut])
            }
            false => e.clone(),
        });
        Self {
            attempt,
            started_at,
            ended_at: now,
            duration_ms: ended.duration_ms,
            exit_code: ended.exit_code,
            failure: ended.failure,
            error,
            first_seq,
            lines: ended.line_count.saturating_sub(first_seq),
            retry_at,
        }
    }
}

/// The seqs attempt `n` wrote (from, to exclusive), given the earlier
/// attempts, the current attempt and the line count: `None` for an attempt
/// that has not run.
pub fn seqs_of(earlier: &[Attempt], current: u32, line_count: u64, n: u32) -> Option<(u64, u64)> {
    if let Some(a) = earlier.iter().find(|a| a.attempt == n) {
        return Some((a.first_seq, a.first_seq + a.lines));
    }
    (n == current).then(|| {
        let first = earlier.last().map_or(0, |a| a.first_seq + a.lines);
        (first, line_count.max(first))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::Status;

    fn failed(kind: FailureKind) -> Completion {
        Completion {
            status: Status::Failed,
            exit_code: Some(1),
            error: Some("x".repeat(5000)),
            failure: Some(kind),
            output: None,
            duration_ms: 3,
            line_count: 7,
        }
    }

    fn request(max_attempts: i64) -> RetryRequest {
        RetryRequest {
            max_attempts: Some(max_attempts),
            ..RetryRequest::default()
        }
    }

    #[test]
    fn bad_policies_are_refused_with_the_field_named() {
        for (req, says) in [
            (
                request(0),
                "retry.max_attempts must be between 1 and 20, got 0",
            ),
            (request(21), "got 21"),
            (RetryRequest::default(), "retry.max_attempts is required"),
            (
                RetryRequest {
                    backoff_ms: Some(-1),
                    ..request(3)
                },
                "retry.backoff_ms must be 0 or more, got -1",
            ),
            (
                RetryRequest {
                    backoff_ms: Some(500),
                    max_backoff_ms: Some(100),
                    ..request(3)
                },
                "less than retry.backoff_ms",
            ),
            (
                RetryRequest {
                    on: Some(vec!["killed".into()]),
                    ..request(3)
                },
                "`killed` is not a failure kind that can be retried",
            ),
            (
                RetryRequest {
                    on: Some(vec!["flaky".into()]),
                    ..request(3)
                },
                "`flaky`",
            ),
            (
                RetryRequest {
                    on: Some(vec![]),
                    ..request(3)
                },
                "retry.on is empty",
            ),
        ] {
            let err = req.check().unwrap_err();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn a_policy_retries_only_its_kinds_while_attempts_are_left() {
        let policy = RetryRequest {
            backoff_ms: Some(100),
            max_backoff_ms: Some(250),
            on: Some(vec!["exit".into(), "node_lost".into()]),
            ..request(3)
        }
        .check()
        .unwrap();
        let first = policy.backoff_after(1, &failed(FailureKind::Exit)).unwrap();
        assert!((50..=100).contains(&first), "{first}");
        let second = policy.backoff_after(2, &failed(FailureKind::Exit)).unwrap();
        assert!((100..=200).contains(&second), "{second}");
        assert_eq!(policy.backoff_after(3, &failed(FailureKind::Exit)), None);
        assert_eq!(policy.backoff_after(1, &failed(FailureKind::Trap)), None);
        assert!(
            policy
                .backoff_after(1, &failed(FailureKind::NodeLost))
                .is_some()
        );
        let mut ok = failed(FailureKind::Exit);
        ok.failure = None;
        assert_eq!(policy.backoff_after(1, &ok), None);
        // The cap holds however many attempts came before.
        let far = RetryPolicy {
            max_attempts: 20,
            ..policy
        };
        assert!(far.backoff_after(19, &failed(FailureKind::Exit)).unwrap() <= 250);
    }

    #[test]
    fn the_default_kinds_leave_out_limits_and_lost_nodes() {
        let policy = request(2).check().unwrap();
        assert_eq!(policy.backoff_ms, DEFAULT_BACKOFF_MS);
        assert!(policy.on.contains(&FailureKind::Exit));
        assert!(!policy.on.contains(&FailureKind::NodeLost));
        assert!(!policy.on.contains(&FailureKind::Memory));
    }

    #[test]
    fn an_attempt_keeps_a_short_error_and_its_seqs() {
        let a = Attempt::of(1, Some(1), 2, &failed(FailureKind::Exit), 10, 20);
        assert_eq!((a.first_seq, a.lines), (2, 5));
        assert!(a.error.unwrap().len() <= ERROR_KEPT + 4);
        let history = vec![Attempt::of(1, None, 0, &failed(FailureKind::Exit), 1, 2)];
        assert_eq!(seqs_of(&history, 2, 12, 1), Some((0, 7)));
        assert_eq!(seqs_of(&history, 2, 12, 2), Some((7, 12)));
        assert_eq!(seqs_of(&history, 2, 12, 3), None);
    }
}
