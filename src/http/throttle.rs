//! Backoff after failed admin authentications (login form, login link, Bearer token), per
//! client IP: guessing the admin token gets slower with every failure beyond a few honest typos.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::bounded::make_room;

/// Failures allowed before the backoff starts.
const FREE_FAILURES: u32 = 5;
const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// An IP with no failure for this long starts afresh.
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// IPs remembered at most; past this, the longest quiet ones are forgotten first.
const MAX_TRACKED: usize = 10_000;

#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

impl LoginThrottle {
    /// How long `ip` must wait before its next try, if it must.
    pub fn wait(&self, ip: IpAddr) -> Option<Duration> {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let until = failures.get(&ip)?.locked_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts a failure; past the free ones, locks the IP for 1 s, 2 s, 4 s … up to 15 min.
    pub fn failed(&self, ip: IpAddr) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        failures.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        if !failures.contains_key(&ip) {
            make_room(&mut failures, MAX_TRACKED, |f| f.last);
        }
        let entry = failures.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        entry.count += 1;
        entry.last = now;
        if entry.count > FREE_FAILURES {
            let exponent = (entry.count - FREE_FAILURES - 1).min(20);
            let lock = Duration::from_secs(1u64 << exponent).min(MAX_LOCK);
            entry.locked_until = Some(now + lock);
        }
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_typos_are_free_then_each_failure_doubles_the_wait() {
        let throttle = LoginThrottle::default();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..FREE_FAILURES {
            throttle.failed(ip);
        }
        assert_eq!(throttle.wait(ip), None);
        throttle.failed(ip);
        assert!(throttle.wait(ip).unwrap() <= Duration::from_secs(1));
        throttle.failed(ip);
        assert!(throttle.wait(ip).unwrap() > Duration::from_secs(1));
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        assert_eq!(throttle.wait(other), None);
        throttle.succeeded(ip);
        assert_eq!(throttle.wait(ip), None);
    }

    #[test]
    fn the_failure_map_stays_bounded() {
        let throttle = LoginThrottle::default();
        for n in 0..(MAX_TRACKED as u32 + 100) {
            throttle.failed(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + n)));
        }
        assert!(throttle.failures.lock().unwrap().len() <= MAX_TRACKED);
    }
}
