//! Which recent attempts deserve the admin's second look: pure logic over audit rows, shared
//! by the dashboard handler and the page that draws the marks.

use std::collections::HashMap;

use crate::store::{AttemptKind, AttemptRecord, Outcome};

/// Failures from one IP among the scanned attempts that make it suspicious.
const REPEATED_FAILURES: usize = 3;

/// Why an attempt deserves a second look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suspicion {
    /// The callback came from another IP or browser than the install that made its state.
    OtherClient,
    /// Its IP failed several times recently.
    RepeatedFailures,
    /// A state presented again after it was used.
    Replayed,
}

/// Marks suspicious attempts among `attempts` (newest first, as the store lists them).
pub fn suspicions(attempts: &[AttemptRecord]) -> HashMap<i64, Vec<Suspicion>> {
    let installs: HashMap<&str, &AttemptRecord> = attempts
        .iter()
        .filter(|a| a.kind == AttemptKind::Install)
        .filter_map(|a| Some((a.state_fingerprint.as_deref()?, a)))
        .collect();
    let mut failures_by_ip: HashMap<&str, usize> = HashMap::new();
    for attempt in attempts.iter().filter(|a| a.outcome == Outcome::Failure) {
        if let Some(ip) = attempt.ip.as_deref() {
            *failures_by_ip.entry(ip).or_default() += 1;
        }
    }
    let mut marks: HashMap<i64, Vec<Suspicion>> = HashMap::new();
    for attempt in attempts {
        let mut found = Vec::new();
        if attempt.kind == AttemptKind::Callback
            && let Some(install) = attempt
                .state_fingerprint
                .as_deref()
                .and_then(|f| installs.get(f))
            && (install.ip != attempt.ip || install.user_agent != attempt.user_agent)
        {
            found.push(Suspicion::OtherClient);
        }
        if attempt.outcome == Outcome::Failure
            && attempt
                .ip
                .as_deref()
                .is_some_and(|ip| failures_by_ip[ip] >= REPEATED_FAILURES)
        {
            found.push(Suspicion::RepeatedFailures);
        }
        if attempt.reason.as_deref() == Some("used_state") {
            found.push(Suspicion::Replayed);
        }
        if !found.is_empty() {
            marks.insert(attempt.id, found);
        }
    }
    marks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now;

    fn attempt(
        id: i64,
        kind: AttemptKind,
        outcome: Outcome,
        reason: Option<&str>,
        ip: &str,
        ua: &str,
        fp: Option<&str>,
    ) -> AttemptRecord {
        AttemptRecord {
            id,
            kind,
            outcome,
            reason: reason.map(Into::into),
            detail: None,
            subdomain: None,
            account_id: None,
            ip: Some(ip.into()),
            user_agent: Some(ua.into()),
            state_fingerprint: fp.map(Into::into),
            created_at: now(),
        }
    }

    #[test]
    fn marks_other_clients_repeated_failures_and_replays() {
        let attempts = vec![
            attempt(
                7,
                AttemptKind::Callback,
                Outcome::Failure,
                Some("unknown_state"),
                "6.6.6.6",
                "curl",
                None,
            ),
            attempt(
                6,
                AttemptKind::Callback,
                Outcome::Failure,
                Some("unknown_state"),
                "6.6.6.6",
                "curl",
                None,
            ),
            attempt(
                5,
                AttemptKind::Callback,
                Outcome::Failure,
                Some("used_state"),
                "6.6.6.6",
                "curl",
                Some("aa"),
            ),
            attempt(
                4,
                AttemptKind::Callback,
                Outcome::Success,
                None,
                "5.5.5.5",
                "Firefox",
                Some("aa"),
            ),
            attempt(
                3,
                AttemptKind::Install,
                Outcome::Started,
                None,
                "1.1.1.1",
                "Firefox",
                Some("aa"),
            ),
            attempt(
                2,
                AttemptKind::Callback,
                Outcome::Success,
                None,
                "2.2.2.2",
                "Chrome",
                Some("bb"),
            ),
            attempt(
                1,
                AttemptKind::Install,
                Outcome::Started,
                None,
                "2.2.2.2",
                "Chrome",
                Some("bb"),
            ),
        ];
        let marks = suspicions(&attempts);
        assert_eq!(marks[&7], [Suspicion::RepeatedFailures]);
        assert_eq!(
            marks[&5],
            [
                Suspicion::OtherClient,
                Suspicion::RepeatedFailures,
                Suspicion::Replayed
            ]
        );
        assert_eq!(marks[&4], [Suspicion::OtherClient]);
        assert!(!marks.contains_key(&2) && !marks.contains_key(&3));
    }
}
