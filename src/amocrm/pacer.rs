//! At most 7 requests in any 1.25 s to each amoCRM account host (so never more than amoCRM's 7
//! per second, with a margin for sends that arrive late), per process, for amoauth's own calls
//! (code exchanges, refreshes, account lookups): few, and each already single-flighted. A
//! window rather than even spacing lets a flow's exchange and account lookup go at once instead
//! of 143 ms apart. The gateway's calls for host apps, which come in bulk and from every
//! replica, are paced across replicas through the database instead (`store::pace`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Hosts can come from callers (a widget install's `referer`), so hosts whose slots are all
/// past the window, which mean the same as none, are dropped once the map holds this many.
const MAX_TRACKED: usize = 10_000;

/// The send slots of each host's last `rate` requests, oldest first.
#[derive(Debug)]
pub(super) struct Pacer {
    rate: usize,
    window: Duration,
    sent: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Pacer {
    /// amoCRM: "not more than 7 requests per second"; beyond it answers 429, then blocks the IP.
    /// The window is the gateway's (1.25 s): late sends bunching with punctual ones stay within 7.
    pub fn amocrm() -> Self {
        Self {
            rate: 7,
            window: Duration::from_millis(1250),
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for this account host's next free slot: at once while fewer than `rate` requests
    /// went out in the last window, else until the oldest of them leaves it.
    pub async fn wait(&self, host: &str) {
        let slot = {
            let mut sent = self
                .sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            if sent.len() >= MAX_TRACKED {
                sent.retain(|_, slots| slots.back().is_some_and(|&last| last + self.window > now));
            }
            let slots = sent.entry(host.to_owned()).or_default();
            let slot = match slots.front() {
                Some(&oldest) if slots.len() >= self.rate => now.max(oldest + self.window),
                _ => now,
            };
            slots.push_back(slot);
            if slots.len() > self.rate {
                slots.pop_front();
            }
            slot
        };
        sleep_until_due(slot).await;
    }
}

/// Sleeps until `deadline` only if it is still ahead. tokio rounds every deadline up to its
/// next 1 ms tick, so even `sleep_until(now)` would hold a free slot until the timer wheel
/// turns. The amoCRM calls' pacing and the gateway's both wait through this.
pub(crate) async fn sleep_until_due(deadline: Instant) {
    if deadline > Instant::now() {
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn seven_requests_go_at_once_the_eighth_waits_for_the_window_others_do_not() {
        let pacer = Pacer::amocrm();
        let start = Instant::now();
        for _ in 0..7 {
            pacer.wait("a.amocrm.ru").await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        pacer.wait("a.amocrm.ru").await;
        assert_eq!(start.elapsed(), Duration::from_millis(1250));
        let other = Instant::now();
        pacer.wait("b.amocrm.ru").await;
        assert_eq!(other.elapsed(), Duration::ZERO);
    }

    /// Whether `future` is done at its first poll.
    fn ready_at_once(future: impl std::future::Future<Output = ()>) -> bool {
        let mut future = std::pin::pin!(future);
        future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_ready()
    }

    /// On the real clock, not a paused one: there a deadline of now falls on a tick, and
    /// waiting for the timer would not show.
    #[tokio::test]
    async fn a_free_slot_is_granted_on_the_first_poll_without_the_timer() {
        let pacer = Pacer::amocrm();
        assert!(
            ready_at_once(pacer.wait("a.amocrm.ru")),
            "a free slot waited for the timer"
        );
        // The gateway's zero wait and any deadline already past go the same way.
        let past = Instant::now();
        assert!(ready_at_once(sleep_until_due(past)));
        assert!(!ready_at_once(sleep_until_due(
            Instant::now() + Duration::from_secs(1)
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn no_second_ever_holds_more_than_seven_requests_to_one_host() {
        let pacer = Pacer::amocrm();
        let start = Instant::now();
        let mut sent = Vec::new();
        for i in 0..40u64 {
            // Callers arrive unevenly: bursts and pauses.
            tokio::time::sleep(Duration::from_millis(if i % 9 == 0 { 700 } else { 3 })).await;
            pacer.wait("a.amocrm.ru").await;
            sent.push(start.elapsed());
        }
        for (i, &at) in sent.iter().enumerate() {
            let in_second = sent[i..]
                .iter()
                .take_while(|&&later| later < at + Duration::from_secs(1))
                .count();
            assert!(
                in_second <= 7,
                "{in_second} requests in the second from {at:?}"
            );
        }
    }
}
