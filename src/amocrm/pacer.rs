//! At most 7 requests per second to each amoCRM account host, as amoCRM allows (per process),
//! for amoauth's own calls (code exchanges, refreshes, account lookups): few, and each already
//! single-flighted. The gateway's calls for host apps, which come in bulk and from every
//! replica, are paced across replicas through the database instead (`store::pace`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Hosts can come from callers (a widget install's `referer`), so past slots, which mean the
/// same as none, are dropped once the map holds this many.
const MAX_TRACKED: usize = 10_000;

/// The next free request slot of each host.
#[derive(Debug)]
pub(super) struct Pacer {
    spacing: Duration,
    next_slot: Mutex<HashMap<String, Instant>>,
}

impl Pacer {
    /// amoCRM: "not more than 7 requests per second"; beyond it answers 429, then blocks the IP.
    pub fn amocrm() -> Self {
        Self {
            spacing: Duration::from_secs(1) / 7,
            next_slot: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for this account host's next free slot.
    pub async fn wait(&self, host: &str) {
        let slot = {
            let mut next = self
                .next_slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if next.len() >= MAX_TRACKED {
                next.retain(|_, slot| *slot > now);
            }
            let slot = next.get(host).copied().unwrap_or(now).max(now);
            next.insert(host.to_owned(), slot + self.spacing);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_to_one_account_are_spaced_others_are_not() {
        let pacer = Pacer::amocrm();
        let start = Instant::now();
        for _ in 0..8 {
            pacer.wait("a.amocrm.ru").await;
        }
        // Eight requests need seven gaps of 1/7 s: one second.
        assert!(
            start.elapsed() >= Duration::from_millis(999),
            "{:?}",
            start.elapsed()
        );
        let other = Instant::now();
        pacer.wait("b.amocrm.ru").await;
        assert!(other.elapsed() < Duration::from_millis(1));
    }
}
