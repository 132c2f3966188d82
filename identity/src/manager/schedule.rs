//! When to renew a certificate: a pure function of its validity, the time,
//! the number of consecutive failures and a jitter value.

use std::time::Duration;

use time::OffsetDateTime;

/// First retry delay after a failed renewal.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// Upper bound of the retry delay (lower for short-lived certificates: a
/// tenth of the lifetime, at least [`RETRY_BASE`]).
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// When to try the next renewal.
///
/// * No failure so far: at half-life, `not_before + (not_after -
///   not_before) / 2`, moved earlier by up to 10 % of the lifetime by
///   `jitter` (in `[0, 1]`) so that many certificates issued together do not
///   renew together; never before `now`.
/// * After `failures` consecutive failures: `now` + exponential backoff
///   `1 s · 2^(failures-1)` capped at min(5 min, lifetime / 10) (but at least
///   1 s), scaled into `[½, 1]` of itself by `jitter`. The old certificate
///   stays in use meanwhile.
///
/// Pass as `not_before` the later of the certificate's notBefore and the
/// time it was received: CAs backdate notBefore for clock skew, which must not
/// pull the renewal earlier.
pub fn next_renewal(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    failures: u32,
    jitter: f64,
) -> OffsetDateTime {
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    let lifetime = (not_after - not_before).max(time::Duration::SECOND);
    if failures == 0 {
        let half: OffsetDateTime = not_before + lifetime / 2;
        let spread: time::Duration = lifetime * (0.1 * jitter);
        let at: OffsetDateTime = half - spread;
        return at.max(now);
    }
    let cap = (lifetime.unsigned_abs() / 10).clamp(RETRY_BASE, RETRY_MAX);
    let exp = failures.saturating_sub(1).min(20);
    let backoff = RETRY_BASE.saturating_mul(1 << exp).min(cap);
    now + backoff.mul_f64(0.5 + 0.5 * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2030-01-01T00:00:00Z
    const T0: OffsetDateTime = match OffsetDateTime::from_unix_timestamp(1_893_456_000) {
        Ok(t) => t,
        Err(_) => panic!("valid timestamp"),
    };

    fn hours(h: i64) -> time::Duration {
        time::Duration::hours(h)
    }

    #[test]
    fn renews_at_half_life_without_jitter() {
        let at = next_renewal(T0, T0 + hours(24), T0 + hours(1), 0, 0.0);
        assert_eq!(at, T0 + hours(12));
    }

    #[test]
    fn jitter_moves_renewal_earlier_by_at_most_a_tenth() {
        let at = next_renewal(T0, T0 + hours(24), T0, 0, 1.0);
        assert_eq!(at, T0 + hours(12) - time::Duration::minutes(144));
        let mid = next_renewal(T0, T0 + hours(24), T0, 0, 0.5);
        assert!(mid < T0 + hours(12) && mid > at);
        // Out-of-range jitter is clamped.
        assert_eq!(next_renewal(T0, T0 + hours(24), T0, 0, 7.0), at);
        assert_eq!(next_renewal(T0, T0 + hours(24), T0, 0, f64::NAN), T0 + hours(12));
    }

    #[test]
    fn never_schedules_in_the_past() {
        let now = T0 + hours(20);
        assert_eq!(next_renewal(T0, T0 + hours(24), now, 0, 0.0), now);
    }

    #[test]
    fn backoff_doubles_then_caps() {
        let now = T0 + hours(12);
        let delays: Vec<i64> = (1..=12)
            .map(|f| (next_renewal(T0, T0 + hours(24), now, f, 1.0) - now).whole_seconds())
            .collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // Jitter 0 halves the delay.
        assert_eq!(next_renewal(T0, T0 + hours(24), now, 4, 0.0) - now, time::Duration::seconds(4));
        // Huge failure counts do not overflow.
        assert_eq!(
            next_renewal(T0, T0 + hours(24), now, u32::MAX, 1.0) - now,
            time::Duration::seconds(300)
        );
    }

    #[test]
    fn short_lived_certificates_retry_faster() {
        let nb = T0;
        let na = T0 + time::Duration::minutes(1);
        let now = T0 + time::Duration::seconds(30);
        assert_eq!(next_renewal(nb, na, T0, 0, 0.0), now);
        // Cap is lifetime/10 = 6 s.
        assert_eq!(next_renewal(nb, na, now, 10, 1.0) - now, time::Duration::seconds(6));
    }
}
