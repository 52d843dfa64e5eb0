//! The gateway's circuit breaker: a burst of 403s from amoCRM pauses calls to that account,
//! and 403 bursts on several accounts at once (amoCRM blocking the server's IP) pause every
//! account, so amoauth stops hammering instead of prolonging the block. Per process: an IP
//! block is about the address this replica calls from.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// This many 403s from one account within `WINDOW` open its circuit.
pub const BURST: usize = 3;
/// This many accounts with open circuits at once look like an IP block: every call pauses.
pub const ACCOUNTS_FOR_ALL: usize = 2;
const WINDOW: Duration = Duration::from_secs(30);
/// How long an open circuit refuses calls; then one call at a time tries again.
pub const COOLDOWN: Duration = Duration::from_secs(60);
/// Accounts tracked at most; the map is keyed by what amoCRM answered for connected accounts,
/// so this only bounds a pathological number of connections.
const MAX_TRACKED: usize = 10_000;

/// Which calls an open circuit stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Account,
    All,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::All => "all",
        }
    }
}

/// A circuit that is open: which, and for how much longer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Open {
    pub scope: Scope,
    pub remaining: Duration,
}

#[derive(Default, Debug)]
struct AccountState {
    /// 403s within the window, oldest first.
    forbidden: Vec<Instant>,
    open_until: Option<Instant>,
}

#[derive(Default, Debug)]
struct State {
    accounts: HashMap<i64, AccountState>,
    all_open_until: Option<Instant>,
}

#[derive(Default, Debug)]
pub struct Circuits {
    state: Mutex<State>,
}

impl Circuits {
    /// Err while a circuit covering this account (or every account) is open.
    pub fn check(&self, account_id: i64) -> Result<(), Open> {
        let state = self.lock();
        let now = Instant::now();
        if let Some(until) = state.all_open_until.filter(|until| *until > now) {
            return Err(Open {
                scope: Scope::All,
                remaining: until - now,
            });
        }
        match state
            .accounts
            .get(&account_id)
            .and_then(|account| account.open_until)
            .filter(|until| *until > now)
        {
            Some(until) => Err(Open {
                scope: Scope::Account,
                remaining: until - now,
            }),
            None => Ok(()),
        }
    }

    /// Notes a 403 from the account; returns the circuits this opened, account first.
    pub fn forbidden(&self, account_id: i64) -> Vec<Scope> {
        let mut state = self.lock();
        let now = Instant::now();
        if state.accounts.len() >= MAX_TRACKED {
            state
                .accounts
                .retain(|_, account| account.open_until.is_some_and(|until| until > now));
        }
        let account = state.accounts.entry(account_id).or_default();
        account.forbidden.retain(|at| now - *at < WINDOW);
        account.forbidden.push(now);
        let mut opened = Vec::new();
        // A 403 after the cooldown (the trial call) re-opens at once.
        let was_open = account.open_until.is_some();
        if account.forbidden.len() >= BURST || was_open {
            account.open_until = Some(now + COOLDOWN);
            account.forbidden.clear();
            opened.push(Scope::Account);
        }
        let open_accounts = state
            .accounts
            .values()
            .filter(|account| account.open_until.is_some_and(|until| until > now))
            .count();
        if open_accounts >= ACCOUNTS_FOR_ALL
            && state.all_open_until.is_none_or(|until| until <= now)
        {
            state.all_open_until = Some(now + COOLDOWN);
            opened.push(Scope::All);
        }
        opened
    }

    /// A call that amoCRM answered with anything but 403: the account's circuit closes.
    pub fn answered(&self, account_id: i64) {
        let mut state = self.lock();
        if let Some(account) = state.accounts.get_mut(&account_id) {
            account.forbidden.clear();
            account.open_until = None;
        }
        if state
            .accounts
            .values()
            .all(|account| account.open_until.is_none())
        {
            state.all_open_until = None;
        }
    }

    /// Open circuits for the dashboard: `(None, remaining)` for all accounts, else the account.
    pub fn open_now(&self) -> Vec<(Option<i64>, Duration)> {
        let state = self.lock();
        let now = Instant::now();
        let all = state
            .all_open_until
            .filter(|until| *until > now)
            .map(|until| (None, until - now));
        let mut accounts: Vec<_> = state
            .accounts
            .iter()
            .filter_map(|(id, account)| {
                let until = account.open_until.filter(|until| *until > now)?;
                Some((Some(*id), until - now))
            })
            .collect();
        accounts.sort();
        all.into_iter().chain(accounts).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_opens_the_account_and_two_accounts_open_all() {
        let circuits = Circuits::default();
        assert!(circuits.forbidden(1).is_empty());
        assert!(circuits.forbidden(1).is_empty());
        assert_eq!(circuits.forbidden(1), vec![Scope::Account]);
        assert_eq!(circuits.check(1).unwrap_err().scope, Scope::Account);
        assert!(circuits.check(2).is_ok(), "other accounts go on");
        for _ in 0..BURST - 1 {
            circuits.forbidden(2);
        }
        assert_eq!(circuits.forbidden(2), vec![Scope::Account, Scope::All]);
        assert_eq!(circuits.check(3).unwrap_err().scope, Scope::All);
        tokio::time::advance(COOLDOWN + Duration::from_secs(1)).await;
        assert!(circuits.check(3).is_ok() && circuits.check(1).is_ok());
        // The trial call after the cooldown is refused again: open at once.
        assert_eq!(circuits.forbidden(1), vec![Scope::Account]);
        circuits.answered(1);
        assert!(circuits.check(1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn scattered_403s_open_nothing() {
        let circuits = Circuits::default();
        for _ in 0..5 {
            assert!(circuits.forbidden(7).is_empty());
            tokio::time::advance(WINDOW / 2).await;
        }
        assert!(circuits.check(7).is_ok());
    }
}
