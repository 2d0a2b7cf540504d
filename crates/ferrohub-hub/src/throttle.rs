//! Per-hub rate limits for twin reads, twin updates and method calls (off unless configured),
//! answered with IoT Hub's 429 / `429001 ThrottlingException`.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Operations per second for each throttled kind; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThrottleSettings {
    pub twin_reads: Option<NonZeroU32>,
    pub twin_updates: Option<NonZeroU32>,
    pub method_calls: Option<NonZeroU32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    TwinRead,
    TwinUpdate,
    MethodCall,
}

/// The hub's limiters. Each allows a burst of one second's worth, as a token bucket.
pub struct Throttles {
    twin_reads: Option<DefaultDirectRateLimiter>,
    twin_updates: Option<DefaultDirectRateLimiter>,
    method_calls: Option<DefaultDirectRateLimiter>,
}

fn limiter(rate: Option<NonZeroU32>) -> Option<DefaultDirectRateLimiter> {
    rate.map(|r| RateLimiter::direct(Quota::per_second(r)))
}

impl Throttles {
    pub fn new(s: ThrottleSettings) -> Self {
        Self {
            twin_reads: limiter(s.twin_reads),
            twin_updates: limiter(s.twin_updates),
            method_calls: limiter(s.method_calls),
        }
    }

    /// Takes one operation from the budget; `false` means over the rate (answer 429).
    pub fn allow(&self, op: Operation) -> bool {
        let l = match op {
            Operation::TwinRead => &self.twin_reads,
            Operation::TwinUpdate => &self.twin_updates,
            Operation::MethodCall => &self.method_calls,
        };
        let allowed = l.as_ref().is_none_or(|l| l.check().is_ok());
        if !allowed {
            crate::metrics::throttled(match op {
                Operation::TwinRead => "twinRead",
                Operation::TwinUpdate => "twinUpdate",
                Operation::MethodCall => "methodCall",
            });
        }
        allowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_by_default_and_limited_when_set() {
        let t = Throttles::new(ThrottleSettings::default());
        assert!((0..10_000).all(|_| t.allow(Operation::TwinRead)));
        let t = Throttles::new(ThrottleSettings {
            twin_updates: NonZeroU32::new(5),
            ..Default::default()
        });
        let allowed = (0..100).filter(|_| t.allow(Operation::TwinUpdate)).count();
        assert!(
            (5..=6).contains(&allowed),
            "a burst of about one second: {allowed}"
        );
        assert!(
            t.allow(Operation::TwinRead),
            "other operations are not limited"
        );
    }
}
