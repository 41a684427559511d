//! When to try again, and when to give up.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; then DEAD.
    pub max_attempts: u32,
    /// An event older than this is not retried again; then DEAD.
    pub max_age: Duration,
    /// Delay after the first failure; doubles with each further one.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 12,
            max_age: Duration::from_secs(24 * 3600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(3600),
        }
    }
}

pub enum RetryDecision {
    RetryAfter(Duration),
    GiveUp(String),
}

impl RetryPolicy {
    /// After failed attempt number `attempt` of an event `age` old. `requested` is the
    /// plugin's wish (e.g. `Retry-After`), honoured when longer than the backoff.
    pub fn after_failure(
        &self,
        attempt: u32,
        age: Duration,
        requested: Option<Duration>,
    ) -> RetryDecision {
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp(format!(
                "gave up after {attempt} attempt(s) (max_attempts = {})",
                self.max_attempts
            ));
        }
        // A plugin's wish beyond max_age means giving up, as any delay past it does; capping
        // it there keeps an absurd wish (u64::MAX ms) from reaching the store's date
        // arithmetic, which has a range.
        let requested = requested.unwrap_or_default().min(self.max_age);
        let delay = self.backoff(attempt).max(requested);
        if age.saturating_add(delay) > self.max_age {
            return RetryDecision::GiveUp(format!(
                "gave up: the next attempt would be past max_age ({})",
                humantime::format_duration(self.max_age)
            ));
        }
        RetryDecision::RetryAfter(delay)
    }

    /// Exponential backoff with "equal jitter": half the delay is fixed, half random, so
    /// retries of many events failing together spread out without ever retrying early.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        let full = self
            .backoff_base
            .saturating_mul(1u32 << exponent)
            .min(self.backoff_max);
        let half = full / 2;
        let jitter_nanos =
            rand::rng().random_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(3600),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let p = policy();
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (4, 8), (10, 60)] {
            let delay = p.backoff(attempt);
            let full = Duration::from_secs(full);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
    }

    #[test]
    fn retry_after_wins_when_longer() {
        match policy().after_failure(1, Duration::ZERO, Some(Duration::from_secs(30))) {
            RetryDecision::RetryAfter(d) => assert_eq!(d, Duration::from_secs(30)),
            RetryDecision::GiveUp(why) => panic!("gave up: {why}"),
        }
    }

    #[test]
    fn gives_up_on_attempts_and_on_age() {
        assert!(matches!(
            policy().after_failure(5, Duration::ZERO, None),
            RetryDecision::GiveUp(why) if why.contains("after 5 attempt(s)")
        ));
        assert!(matches!(
            policy().after_failure(1, Duration::from_secs(3599), Some(Duration::from_secs(5))),
            RetryDecision::GiveUp(why) if why.contains("max_age")
        ));
    }

    #[test]
    fn a_wish_beyond_max_age_gives_up() {
        let forever = Some(Duration::from_millis(u64::MAX));
        assert!(matches!(
            policy().after_failure(1, Duration::from_secs(1), forever),
            RetryDecision::GiveUp(why) if why.contains("max_age")
        ));
    }
}
