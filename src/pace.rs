//! Rate limits for background work that must not crowd out downloads (the scrub's
//! `--scrub-rate`, `imgsrv backup --rate`): the work sleeps whenever it is ahead of its rate,
//! in short naps so that a stop is noticed at once.

use std::time::{Duration, Instant};

/// The longest nap: how long a stop may go unnoticed.
const NAP: Duration = Duration::from_millis(100);

/// When `bytes` done since `began` are due at `rate` bytes a second.
pub fn due(began: Instant, bytes: u64, rate: u64) -> Instant {
    began + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64)
}

/// Sleeps until `until`, asking `go_on` before each nap and once more at the end; false as
/// soon as it says stop.
pub fn sleep_until(until: Instant, go_on: &mut dyn FnMut() -> bool) -> bool {
    while Instant::now() < until {
        if !go_on() {
            return false;
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()).min(NAP));
    }
    go_on()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_is_bytes_over_rate_and_a_stop_ends_the_sleep() {
        let t = Instant::now();
        assert_eq!(due(t, 3 << 20, 1 << 20), t + Duration::from_secs(3));
        // A stop is honoured before the deadline, and a deadline passed returns at once.
        assert!(!sleep_until(t + Duration::from_secs(60), &mut || false));
        assert!(t.elapsed() < Duration::from_secs(30));
        assert!(sleep_until(t, &mut || true));
    }
}
