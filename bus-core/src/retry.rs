//! [`RetryPolicy`]: how often and how late a failed handling is tried again.
//!
//! Attempt 1 is the first delivery. Before attempt `n >= 2` the bus waits
//! `min(initial_delay * multiplier^(n-2), max_delay)`, shortened by up to `jitter` (a fraction) at random so that
//! failures that happened together do not retry together. After `max_attempts` failed attempts, or at once for a
//! permanent error, the event is dead-lettered.

use std::time::Duration;

use crate::error::BusError;

/// The longest retry schedule ([`RetryPolicy::horizon`]) a subscription may have, on every bus: keyed events
/// retry in place (the delivery stays unacknowledged and the later events of its key wait behind it), and on
/// RabbitMQ this stays well within the broker's default `consumer_timeout` of 30 minutes, past which it closes
/// the channel.
pub const MAX_RETRY_HORIZON: Duration = Duration::from_secs(10 * 60);

/// Retry schedule for failed handling. Validated by [`RetryPolicy::validate`] when a bus or subscription starts.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts, the first delivery included (≥ 1; 1 means no retry).
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// Growth factor between attempts (≥ 1.0).
    pub multiplier: f64,
    /// Random reduction of each delay, as a fraction in `[0, 1]` (0.2: each delay is 80–100 % of nominal).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 200 ms doubling up to 30 s, 20 % jitter (retry horizon ≈ 3 s).
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries: a failed handling is dead-lettered at once.
    pub fn no_retry() -> Self {
        Self { max_attempts: 1, ..Self::default() }
    }

    /// `max_attempts` attempts with exponential backoff from `initial_delay`, other fields at their defaults.
    pub fn exponential(max_attempts: u32, initial_delay: Duration) -> Self {
        Self { max_attempts, initial_delay, ..Self::default() }
    }

    /// Sets the delay cap.
    pub fn with_max_delay(mut self, max_delay: Duration) -> Self {
        self.max_delay = max_delay;
        self
    }

    /// Sets the jitter fraction.
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Checks the fields.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming the field (`retry.max_attempts`, ...).
    pub fn validate(&self) -> Result<(), BusError> {
        if self.max_attempts == 0 {
            return Err(BusError::invalid_config("retry.max_attempts", "must be at least 1"));
        }
        if self.max_attempts > 1000 {
            return Err(BusError::invalid_config("retry.max_attempts", "must be at most 1000"));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(BusError::invalid_config("retry.multiplier", "must be a finite number >= 1.0"));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(BusError::invalid_config("retry.jitter", "must be between 0.0 and 1.0"));
        }
        if self.initial_delay > self.max_delay {
            return Err(BusError::invalid_config("retry.initial_delay", "must not exceed retry.max_delay"));
        }
        Ok(())
    }

    /// The nominal (jitter-free) delay before attempt `attempt` (≥ 2); zero for attempt 1.
    fn nominal_delay(&self, attempt: u32) -> Duration {
        if attempt < 2 {
            return Duration::ZERO;
        }
        let factor = self.multiplier.powi(i32::try_from(attempt - 2).unwrap_or(i32::MAX));
        let secs = self.initial_delay.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay before attempt `attempt`, jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let nominal = self.nominal_delay(attempt);
        if self.jitter <= 0.0 {
            return nominal;
        }
        nominal.mul_f64(1.0 - self.jitter * fastrand::f64())
    }

    /// True if a failure on attempt `attempt` is followed by another attempt.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// Checks that the schedule ends within [`MAX_RETRY_HORIZON`], as every bus requires of a subscription's
    /// policy (an outbox relay's schedule may be longer).
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming `retry`.
    pub fn validate_for_handlers(&self) -> Result<(), BusError> {
        self.validate()?;
        if self.horizon() > MAX_RETRY_HORIZON {
            return Err(BusError::invalid_config(
                "retry",
                format!(
                    "keyed events retry in place, so the retry schedule must end within {} minutes (this one takes \
                     {:?})",
                    MAX_RETRY_HORIZON.as_secs() / 60,
                    self.horizon()
                ),
            ));
        }
        Ok(())
    }

    /// The longest time between the first delivery and the last attempt (sum of nominal delays). Deduplication
    /// must remember an event at least this long.
    pub fn horizon(&self) -> Duration {
        (2..=self.max_attempts).map(|a| self.nominal_delay(a)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let p = RetryPolicy::exponential(6, Duration::from_millis(100))
            .with_max_delay(Duration::from_millis(500))
            .with_jitter(0.0);
        let d: Vec<_> = (1..=6).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(d, vec![0, 100, 200, 400, 500, 500]);
        assert_eq!(p.horizon(), Duration::from_millis(1700));
        assert!(p.should_retry(5) && !p.should_retry(6));
    }

    #[test]
    fn jitter_only_shortens() {
        let p = RetryPolicy::exponential(3, Duration::from_millis(100)).with_jitter(0.5);
        for _ in 0..100 {
            let d = p.delay(2);
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100), "{d:?}");
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        let p = RetryPolicy { max_attempts: 0, ..RetryPolicy::default() };
        assert!(p.validate().unwrap_err().to_string().contains("retry.max_attempts"));
        let p = RetryPolicy::default().with_jitter(2.0);
        assert!(p.validate().unwrap_err().to_string().contains("retry.jitter"));
        let p = RetryPolicy::exponential(3, Duration::from_secs(60));
        assert!(p.validate().unwrap_err().to_string().contains("retry.initial_delay"));
        assert!(RetryPolicy::default().validate().is_ok());
        let long = RetryPolicy::exponential(30, Duration::from_secs(1)).with_max_delay(Duration::from_secs(60));
        assert!(long.validate().is_ok());
        assert!(long.validate_for_handlers().unwrap_err().to_string().contains("within 10 minutes"));
        assert!(RetryPolicy::default().validate_for_handlers().is_ok());
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = RetryPolicy { max_attempts: 1000, ..RetryPolicy::default() };
        assert_eq!(p.nominal_delay(1000), p.max_delay);
    }
}
