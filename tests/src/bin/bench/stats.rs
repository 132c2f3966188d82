//! Pure arithmetic of the benchmark: percentiles of latency samples, the
//! per-figure summary over rounds (median, min, max) and number conversions.

use serde::Serialize;

/// Lossy `u64` → `f64` (counts and byte totals far below 2^52).
#[expect(clippy::cast_precision_loss, reason = "benchmark counts stay far below 2^52")]
pub fn f(x: u64) -> f64 {
    x as f64
}

/// `usize` → `f64`.
pub fn fu(x: usize) -> f64 {
    f(u64::try_from(x).unwrap_or(u64::MAX))
}

/// The `q`-quantile (0..=1) of already sorted samples, nearest-rank method.
pub fn quantile_sorted(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let n = fu(sorted.len());
    // Nearest rank: the smallest value with at least q·n samples at or below it.
    let rank = (q.clamp(0.0, 1.0) * n).ceil();
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "rank is in 0..=len, non-negative and small"
    )]
    let idx = (rank as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[idx])
}

/// Median of a list (mean of the middle two for even lengths).
pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) })
}

/// One figure of one candidate over all rounds: the values of the rounds
/// that worked and the reasons of those that did not.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figure {
    /// One value per successful round.
    pub values: Vec<f64>,
    /// One reason per failed round.
    pub errors: Vec<String>,
    /// Median of `values` (set by `finish`).
    pub median: Option<f64>,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
}

impl Figure {
    /// Records one round.
    pub fn push(&mut self, r: Result<f64, String>) {
        match r {
            Ok(v) if v.is_finite() => self.values.push(v),
            Ok(v) => self.errors.push(format!("not a number ({v})")),
            Err(e) => self.errors.push(e),
        }
        self.finish();
    }

    /// Recomputes the summary.
    pub fn finish(&mut self) {
        self.median = median(&self.values);
        self.min = self.values.iter().copied().reduce(f64::min);
        self.max = self.values.iter().copied().reduce(f64::max);
    }

    /// The first failure reason, when no round produced a value.
    pub fn failure(&self) -> Option<&str> {
        if self.values.is_empty() {
            Some(self.errors.first().map_or("not measured", String::as_str))
        } else {
            None
        }
    }

    /// `median(self) / median(base)`.
    pub fn ratio_to(&self, base: &Figure) -> Option<f64> {
        match (self.median, base.median) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        }
    }

    /// `median(self) - median(base)`.
    pub fn minus(&self, base: &Figure) -> Option<f64> {
        Some(self.median? - base.median?)
    }
}

/// A figure holding one value.
#[cfg(test)]
pub fn fig(values: &[f64]) -> Figure {
    let mut f = Figure::default();
    for v in values {
        f.push(Ok(*v));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile_sorted(&v, 0.5), Some(500));
        assert_eq!(quantile_sorted(&v, 0.99), Some(990));
        assert_eq!(quantile_sorted(&v, 0.999), Some(999));
        assert_eq!(quantile_sorted(&v, 1.0), Some(1000));
        assert_eq!(quantile_sorted(&v, 0.0), Some(1));
        assert_eq!(quantile_sorted(&[7], 0.999), Some(7));
        assert_eq!(quantile_sorted(&[], 0.5), None);
    }

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn figure_summary_and_failures() {
        let mut f = Figure::default();
        f.push(Err("refused".into()));
        assert_eq!(f.failure(), Some("refused"));
        f.push(Ok(2.0));
        f.push(Ok(4.0));
        f.push(Ok(3.0));
        assert_eq!((f.median, f.min, f.max), (Some(3.0), Some(2.0), Some(4.0)));
        assert_eq!(f.failure(), None);
        assert_eq!(f.ratio_to(&fig(&[6.0])), Some(0.5));
        assert_eq!(f.minus(&fig(&[1.0])), Some(2.0));
        assert_eq!(f.ratio_to(&Figure::default()), None);
        f.push(Ok(f64::NAN));
        assert_eq!(f.values.len(), 3);
    }
}
