//! How a failed attempt is classified, and how long to wait before the next one.
//!
//! Classification (what kind of failure) is kept apart from policy (how many
//! attempts, how long to wait), each tested on its own.

use std::time::Duration;

use crate::outcome::ErrorCode;

/// What a failed attempt means for the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// Worth trying again later (5xx, timeouts, connection errors, 429).
    /// `retry_after` is the provider's own instruction, when it gave one.
    /// `code` is what the job fails with when no attempt is left.
    Transient {
        code: ErrorCode,
        retry_after: Option<Duration>,
    },
    /// The access token was refused: refresh it once and try again.
    Unauthorized,
    /// Trying again cannot help.
    Permanent(ErrorCode),
}

impl FailureClass {
    pub fn throttled(retry_after: Option<Duration>) -> Self {
        FailureClass::Transient {
            code: ErrorCode::Throttled,
            retry_after,
        }
    }

    pub fn unavailable(retry_after: Option<Duration>) -> Self {
        FailureClass::Transient {
            code: ErrorCode::ProviderUnavailable,
            retry_after,
        }
    }

    pub fn is_transient(self) -> bool {
        matches!(self, FailureClass::Transient { .. })
    }
}

/// Exponential backoff with full jitter: the delay before attempt `n + 1` is a
/// uniform draw in `[0, min(max, base * 2^(n-1))]` (AWS Architecture Blog,
/// "Exponential Backoff And Jitter"). The draw is passed in so this stays pure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The upper bound of the wait after `attempts_made` failed attempts (≥ 1).
    pub fn ceiling(&self, attempts_made: u32) -> Duration {
        let exp = attempts_made.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// The wait for a uniform draw `unit` in `[0, 1)`.
    pub fn delay(&self, attempts_made: u32, unit: f64) -> Duration {
        self.ceiling(attempts_made).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// Bounds on how long a job keeps trying.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts at most, the first one included.
    pub max_attempts: u32,
    /// A job first seen longer ago than this is not retried again.
    pub max_age: Duration,
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            max_age: Duration::from_secs(6 * 3600),
            backoff: Backoff {
                base: Duration::from_secs(2),
                max: Duration::from_secs(15 * 60),
            },
        }
    }
}

/// A throttled job waits its `Retry-After` and up to this share of it more.
pub const THROTTLE_SPREAD: f64 = 0.1;

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Try again after this long.
    RetryAfter(Duration),
    /// Stop: the job fails with this code.
    GiveUp(ErrorCode),
}

impl RetryPolicy {
    /// Decides what follows a failure, given how many attempts were made so far,
    /// how old the job is, and a uniform draw for the jitter.
    pub fn decide(
        &self,
        class: FailureClass,
        attempts_made: u32,
        age: Duration,
        unit: f64,
    ) -> RetryDecision {
        match class {
            FailureClass::Permanent(code) => RetryDecision::GiveUp(code),
            // A second refusal after a refresh means the grant itself is bad.
            FailureClass::Unauthorized => RetryDecision::GiveUp(ErrorCode::AuthRevoked),
            FailureClass::Transient { code, retry_after } => {
                // A throttled attempt is the provider saying "later", not a failure of the
                // job: throttling is bounded by the maximum age, not the attempt budget.
                if attempts_made >= self.max_attempts && code != ErrorCode::Throttled {
                    return RetryDecision::GiveUp(code);
                }
                let wait = match retry_after {
                    // A throttle says when the provider takes requests again
                    // (Graph's concurrency 429 says 1 s): that, not a backoff
                    // that grows with every throttle of a busy mailbox. Up to a
                    // tenth more, so that jobs throttled together do not all
                    // come back at the same instant.
                    Some(after) if code == ErrorCode::Throttled => {
                        after.saturating_add(after.mul_f64(THROTTLE_SPREAD * unit.clamp(0.0, 1.0)))
                    }
                    // Another failure's Retry-After never shortens our backoff.
                    Some(after) => after.max(self.backoff.delay(attempts_made, unit)),
                    None => self.backoff.delay(attempts_made, unit),
                };
                if age.saturating_add(wait) > self.max_age {
                    return RetryDecision::GiveUp(code);
                }
                RetryDecision::RetryAfter(wait)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_age: S(3600),
            backoff: Backoff {
                base: S(2),
                max: S(60),
            },
        }
    }

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let b = policy().backoff;
        let ceilings: Vec<_> = (1..=7).map(|n| b.ceiling(n).as_secs()).collect();
        assert_eq!(ceilings, [2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.ceiling(u32::MAX), S(60));
    }

    #[test]
    fn jitter_spans_zero_to_the_ceiling() {
        let b = policy().backoff;
        assert_eq!(b.delay(3, 0.0), S(0));
        assert_eq!(b.delay(3, 0.5), S(4));
        assert_eq!(b.delay(3, 1.0), S(8));
    }

    #[test]
    fn decisions_follow_the_class() {
        let p = policy();
        let table = [
            (
                FailureClass::Permanent(ErrorCode::SenderNotAllowed),
                1,
                0,
                RetryDecision::GiveUp(ErrorCode::SenderNotAllowed),
            ),
            (
                FailureClass::Permanent(ErrorCode::RecipientRejected),
                1,
                0,
                RetryDecision::GiveUp(ErrorCode::RecipientRejected),
            ),
            (
                FailureClass::Unauthorized,
                1,
                0,
                RetryDecision::GiveUp(ErrorCode::AuthRevoked),
            ),
            (
                FailureClass::unavailable(None),
                1,
                0,
                RetryDecision::RetryAfter(S(1)),
            ),
            (
                FailureClass::unavailable(None),
                5,
                0,
                RetryDecision::GiveUp(ErrorCode::ProviderUnavailable),
            ),
            (
                FailureClass::throttled(Some(S(30))),
                1,
                0,
                RetryDecision::RetryAfter(Duration::from_millis(31_500)),
            ),
            (
                FailureClass::throttled(Some(S(30))),
                50,
                0,
                RetryDecision::RetryAfter(Duration::from_millis(31_500)),
            ),
            (
                FailureClass::unavailable(Some(S(1))),
                4,
                0,
                RetryDecision::RetryAfter(S(8)),
            ),
            (
                FailureClass::throttled(Some(S(30))),
                2,
                3590,
                RetryDecision::GiveUp(ErrorCode::Throttled),
            ),
        ];
        for (class, attempts, age, expected) in table {
            assert_eq!(
                p.decide(class, attempts, S(age), 0.5),
                expected,
                "{class:?} after {attempts}"
            );
        }
    }

    #[test]
    fn a_throttle_waits_its_retry_after_however_often_the_job_was_throttled() {
        let p = policy();
        for attempts in [1, 3, 6, 40] {
            for unit in [0.0, 0.5, 0.999] {
                let RetryDecision::RetryAfter(wait) =
                    p.decide(FailureClass::throttled(Some(S(1))), attempts, S(0), unit)
                else {
                    panic!("a throttle is retried");
                };
                assert!(
                    wait >= S(1) && wait <= Duration::from_millis(1100),
                    "after {attempts} throttles: {wait:?}"
                );
            }
        }
        // Without a Retry-After, the backoff still applies.
        assert_eq!(
            p.decide(FailureClass::throttled(None), 3, S(0), 1.0),
            RetryDecision::RetryAfter(S(8))
        );
    }
}
