//! What the benchmark examples share: their `--name value` arguments, tc's rates, and
//! quantiles of the measured times.

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// A tc rate (`200mbit`, `1gbit`, `512kbit`, bits) in bits per second.
pub fn parse_rate(rate: &str) -> f64 {
    let lower = rate.to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = lower.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = lower.strip_suffix("kbit") {
        (n, 1e3)
    } else {
        (lower.as_str(), 1.0)
    };
    num.parse::<f64>().expect("rate like 200mbit") * mult
}

/// The `q` quantile (0..=1, nearest rank) of `v`, which must not be empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_quantiles() {
        assert_eq!(parse_rate("200mbit"), 200e6);
        assert_eq!(parse_rate("1Gbit"), 1e9);
        assert_eq!(parse_rate("512kbit"), 512e3);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), 3.0);
    }
}
