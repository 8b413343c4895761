//! Median, minimum and maximum of a set of samples.

/// What is reported for one metric of one VMM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub count: usize,
}

/// The median: the middle sample, or the mean of the two middle ones for an even count.
/// `None` for no samples.
pub fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// `a` over `b`, when both are there and `b` is positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Median, minimum and maximum; `None` for no samples.
pub fn summarize(samples: &[f64]) -> Option<Summary> {
    let median = median(samples)?;
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Summary {
        median,
        min,
        max,
        count: samples.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_nothing_is_none() {
        assert_eq!(median(&[]), None);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn median_of_odd_count_is_the_middle_sample_whatever_the_order() {
        assert_eq!(median(&[7.0]), Some(7.0));
        assert_eq!(median(&[9.0, 1.0, 5.0]), Some(5.0));
        assert_eq!(median(&[3.0, 3.0, 1.0, 100.0, 2.0]), Some(3.0));
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_two_middle_samples() {
        assert_eq!(median(&[4.0, 1.0]), Some(2.5));
        assert_eq!(median(&[10.0, 2.0, 4.0, 8.0]), Some(6.0));
    }

    #[test]
    fn summary_has_min_max_and_count() {
        let s = summarize(&[2.0, 40.0, 3.0, 1.5]).expect("samples");
        assert_eq!(
            s,
            Summary {
                median: 2.5,
                min: 1.5,
                max: 40.0,
                count: 4
            }
        );
    }
}
