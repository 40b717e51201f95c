//! Rate limits in Celery's notation: `N/s`, `N/m`, `N/h` (a bare number means per second).

use std::time::Duration;

/// The minimum interval between two starts for a rate limit string.
///
/// ```
/// use std::time::Duration;
/// use celery_core::rate::parse_rate;
/// assert_eq!(parse_rate("10/s").unwrap(), Duration::from_millis(100));
/// assert_eq!(parse_rate("60/m").unwrap(), Duration::from_secs(1));
/// assert!(parse_rate("fast").is_err());
/// ```
pub fn parse_rate(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.trim().split_once('/').unwrap_or((s.trim(), "s"));
    let n: f64 = n.trim().parse().map_err(|_| format!("rate limit `{s}`: expected N/s, N/m or N/h"))?;
    if n <= 0.0 || !n.is_finite() {
        return Err(format!("rate limit `{s}`: the count must be positive"));
    }
    let per = match unit.trim() {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        other => return Err(format!("rate limit `{s}`: unknown unit `{other}` (s, m or h)")),
    };
    Ok(crate::clock::secs_f64(per / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_rates_saturate() {
        assert_eq!(parse_rate("1e-300/h").unwrap(), Duration::MAX);
        assert_eq!(parse_rate("1e300/s").unwrap(), Duration::ZERO);
        assert!(parse_rate("NaN/s").is_err());
        assert!(parse_rate("-1/s").is_err());
        assert!(parse_rate("inf/s").is_err());
    }
}
