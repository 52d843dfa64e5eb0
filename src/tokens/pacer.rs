//! At most 7 requests per second to each amoCRM account, as amoCRM allows (per process).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct Pacer {
    spacing: Duration,
    next_slot: Mutex<HashMap<i64, Instant>>,
}

impl Pacer {
    /// amoCRM: "not more than 7 requests per second"; beyond it answers 429, then blocks the IP.
    pub fn amocrm() -> Self {
        Self {
            spacing: Duration::from_secs(1) / 7,
            next_slot: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for this connection's next free slot.
    pub async fn wait(&self, connection: i64) {
        let slot = {
            let mut next = self
                .next_slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let slot = next.get(&connection).copied().unwrap_or(now).max(now);
            next.insert(connection, slot + self.spacing);
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
            pacer.wait(1).await;
        }
        // Eight requests need seven gaps of 1/7 s: one second.
        assert!(
            start.elapsed() >= Duration::from_millis(999),
            "{:?}",
            start.elapsed()
        );
        let other = Instant::now();
        pacer.wait(2).await;
        assert!(other.elapsed() < Duration::from_millis(1));
    }
}
