//! What became of the event on this route.

use std::time::Duration;

/// The answer of [`crate::Plugin::handle`]. Build it with the constructors; match on it
/// in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The effect happened. The receipt (e.g. `HTTP 204`) is kept in the attempts log.
    /// Only with this outcome are emitted events committed.
    Delivered { receipt: Option<String> },
    /// A transient failure: the host tries again later, within the route's retry
    /// policy, waiting at least `after` when given (e.g. from `Retry-After`).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// A permanent failure: no more attempts; the event goes to the dead letters.
    Dead { reason: String },
    /// Nothing to do for this event on this route.
    Skip { reason: String },
}

impl Outcome {
    pub fn delivered() -> Self {
        Outcome::Delivered { receipt: None }
    }

    /// Delivered, with a receipt for the attempts log (e.g. `HTTP 204`, a message id).
    pub fn delivered_with(receipt: impl Into<String>) -> Self {
        Outcome::Delivered {
            receipt: Some(receipt.into()),
        }
    }

    /// Try again after the route's backoff.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            after: None,
            reason: reason.into(),
        }
    }

    /// Try again, but not before `after` (the route's backoff still applies if longer).
    pub fn retry_after(after: Duration, reason: impl Into<String>) -> Self {
        Outcome::Retry {
            after: Some(after),
            reason: reason.into(),
        }
    }

    pub fn dead(reason: impl Into<String>) -> Self {
        Outcome::Dead {
            reason: reason.into(),
        }
    }

    pub fn skip(reason: impl Into<String>) -> Self {
        Outcome::Skip {
            reason: reason.into(),
        }
    }

    /// The reason of a retry, dead or skip; `None` when delivered.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Retry { reason, .. } | Outcome::Dead { reason } | Outcome::Skip { reason } => {
                Some(reason)
            }
        }
    }
}
