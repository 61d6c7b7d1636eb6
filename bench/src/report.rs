//! The output format fixed by DESIGN.md: one JSON object per figure on stdout; everything else on stderr.

use serde::Serialize;

/// One measured figure.
#[derive(Debug, Serialize)]
pub struct Figure {
    pub figure: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// The raw baseline measured in the same run (`None` for latency and memory bounds).
    pub baseline: Option<f64>,
    /// `value / baseline`, or `None` without a baseline.
    pub ratio: Option<f64>,
    /// The target ratio, or the bound for figures without a baseline.
    pub target: f64,
}

impl Figure {
    /// A figure compared with a baseline.
    pub fn ratio(figure: &'static str, unit: &'static str, value: f64, baseline: f64, target: f64) -> Self {
        let ratio = if baseline > 0.0 { Some(round(value / baseline, 3)) } else { None };
        Self { figure, value: round(value, 1), unit, baseline: Some(round(baseline, 1)), ratio, target }
    }

    /// A latency against the floor measured in the same run: `ratio` = value / floor (lower is better);
    /// `target` is the ratio not to exceed, or, for the figures at the peer's rate, the peer's milliseconds.
    pub fn latency(figure: &'static str, value: f64, floor: f64, target: f64) -> Self {
        let ratio = if floor > 0.0 { Some(round(value / floor, 3)) } else { None };
        Self { figure, value: round(value, 2), unit: "ms", baseline: Some(round(floor, 2)), ratio, target }
    }

    /// A figure checked against a bound (no baseline).
    pub fn bound(figure: &'static str, unit: &'static str, value: f64, bound: f64) -> Self {
        Self { figure, value: round(value, 2), unit, baseline: None, ratio: None, target: bound }
    }

    /// Prints the JSON line on stdout.
    pub fn emit(&self) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string(self)?);
        Ok(())
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// The median of samples (they are few: runs of one scenario).
pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    match samples.len() {
        0 => 0.0,
        n if n % 2 == 1 => samples[n / 2],
        n => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

/// Prints the machine the figures come from, on stderr.
pub fn print_machine() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!("machine: {cores} cores, {cpu}, Linux {}", kernel.trim());
    eprintln!(
        "build: {}, allocator: mimalloc",
        if cfg!(debug_assertions) { "debug (numbers are meaningless; use --release)" } else { "release" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_has_the_fixed_shape() {
        let line =
            serde_json::to_string(&Figure::ratio("relay_throughput", "events/s", 12345.0, 15000.0, 0.7)).unwrap();
        assert_eq!(
            line,
            r#"{"figure":"relay_throughput","value":12345.0,"unit":"events/s","baseline":15000.0,"ratio":0.823,"target":0.7}"#
        );
        let line = serde_json::to_string(&Figure::bound("e2e_latency_p50_ms", "ms", 2.5, 3.0)).unwrap();
        assert_eq!(
            line,
            r#"{"figure":"e2e_latency_p50_ms","value":2.5,"unit":"ms","baseline":null,"ratio":null,"target":3.0}"#
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
