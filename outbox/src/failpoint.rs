//! Crash points for fault-injection tests, compiled only with the `failpoints` feature (never in a release
//! build of an application that does not ask for it).
//!
//! `BUS_FAILPOINT=<name>@<n>` makes the process abort (as `kill -9` would: no destructors, no graceful
//! anything) the `n`-th time it reaches the crash point `name` (`n` defaults to 1). Points:
//! - `relay-after-confirm`: the bus confirmed a batch, the relay has not marked it published yet.

use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

/// Aborts the process if `BUS_FAILPOINT` names `point` and this is the chosen hit.
pub(crate) fn crash_point(point: &str) {
    let Ok(spec) = std::env::var("BUS_FAILPOINT") else { return };
    let (name, nth) = spec.split_once('@').unwrap_or((spec.as_str(), "1"));
    if name != point {
        return;
    }
    let nth: u64 = nth.parse().unwrap_or(1);
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("failpoint {point}: aborting the process (hit {nth})");
        std::process::abort();
    }
}
