//! The admin dashboard: connections at a glance, recent attempts with suspicious ones marked,
//! and the refresh-now and disconnect actions (POST with a CSRF token).

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Admin, csrf_field};
use super::pages::{self, Lang};
use super::{AppState, local, store_unavailable};
use crate::store::{AttemptRecord, StoreError, now};

/// Attempts shown on the dashboard; more are read to find each callback's install.
const SHOWN_ATTEMPTS: usize = 30;
const SCANNED_ATTEMPTS: i64 = 300;
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
        .filter(|a| a.kind == "install")
        .filter_map(|a| Some((a.state_fingerprint.as_deref()?, a)))
        .collect();
    let mut failures_by_ip: HashMap<&str, usize> = HashMap::new();
    for attempt in attempts.iter().filter(|a| a.outcome == "failure") {
        if let Some(ip) = attempt.ip.as_deref() {
            *failures_by_ip.entry(ip).or_default() += 1;
        }
    }
    let mut marks: HashMap<i64, Vec<Suspicion>> = HashMap::new();
    for attempt in attempts {
        let mut found = Vec::new();
        if attempt.kind == "callback"
            && let Some(install) = attempt
                .state_fingerprint
                .as_deref()
                .and_then(|f| installs.get(f))
            && (install.ip != attempt.ip || install.user_agent != attempt.user_agent)
        {
            found.push(Suspicion::OtherClient);
        }
        if attempt.outcome == "failure"
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

#[derive(Deserialize)]
pub struct HomeQuery {
    /// What the last action did, shown once.
    done: Option<String>,
}

pub async fn home(
    admin: Admin,
    State(state): State<AppState>,
    Query(query): Query<HomeQuery>,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let store = state.flow.store();
    let loaded = async {
        Ok::<_, StoreError>((
            store.connections().await?,
            store.recent_attempts(SCANNED_ATTEMPTS).await?,
        ))
    }
    .await;
    let (connections, mut attempts) = match loaded {
        Ok(loaded) => loaded,
        Err(err) => return store_unavailable(lang, &err),
    };
    let marks = suspicions(&attempts);
    attempts.truncate(SHOWN_ATTEMPTS);
    let notice = query.done.as_deref().and_then(pages::Notice::parse);
    let csrf = admin.csrf_token(&state.admin_token);
    let page = pages::home(
        lang,
        &connections,
        &attempts,
        &marks,
        now(),
        csrf.as_deref(),
        notice,
        &state.gateway.circuits().open_now(),
    );
    Html(page.into_string()).into_response()
}

fn back_to_dashboard(done: &str) -> Response {
    (
        StatusCode::SEE_OTHER,
        [(LOCATION, format!("{}?done={done}", local("/")))],
    )
        .into_response()
}

fn refuse_csrf(lang: Lang) -> Response {
    let page = pages::error(
        lang,
        "Запрос отклонён",
        "Request refused",
        "The form's CSRF token is missing or wrong; reload the dashboard and try again.",
    );
    (StatusCode::FORBIDDEN, Html(page.into_string())).into_response()
}

/// Refreshes one connection now, whatever its expiry.
pub async fn refresh_now(
    admin: Admin,
    State(state): State<AppState>,
    Path(account_id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lang = Lang::from_headers(&headers);
    if !admin.csrf_ok(csrf_field(&body).as_deref(), &state.admin_token) {
        return refuse_csrf(lang);
    }
    let row = match state
        .flow
        .store()
        .find_connection(&account_id.to_string())
        .await
    {
        Ok(Some(row)) => row,
        Ok(None) => return back_to_dashboard("not_found"),
        Err(err) => return store_unavailable(lang, &err),
    };
    match state.tokens.refresh(row.id, row.version).await {
        Ok(_) => back_to_dashboard("refreshed"),
        // The failure is stored as the connection's last error, shown on the dashboard.
        Err(_) => back_to_dashboard("refresh_failed"),
    }
}

/// Disconnects a connection here (amoCRM keeps the integration installed): tokens wiped.
pub async fn disconnect(
    admin: Admin,
    State(state): State<AppState>,
    Path(account_id): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lang = Lang::from_headers(&headers);
    if !admin.csrf_ok(csrf_field(&body).as_deref(), &state.admin_token) {
        return refuse_csrf(lang);
    }
    match state.flow.disconnect(account_id).await {
        Ok(_) => {
            tracing::info!(account_id, "disconnected from the dashboard");
            back_to_dashboard("disconnected")
        }
        Err(err) => store_unavailable(lang, &err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(
        id: i64,
        kind: &str,
        outcome: &str,
        reason: Option<&str>,
        ip: &str,
        ua: &str,
        fp: Option<&str>,
    ) -> AttemptRecord {
        AttemptRecord {
            id,
            kind: kind.into(),
            outcome: outcome.into(),
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
                "callback",
                "failure",
                Some("unknown_state"),
                "6.6.6.6",
                "curl",
                None,
            ),
            attempt(
                6,
                "callback",
                "failure",
                Some("unknown_state"),
                "6.6.6.6",
                "curl",
                None,
            ),
            attempt(
                5,
                "callback",
                "failure",
                Some("used_state"),
                "6.6.6.6",
                "curl",
                Some("aa"),
            ),
            attempt(
                4,
                "callback",
                "success",
                None,
                "5.5.5.5",
                "Firefox",
                Some("aa"),
            ),
            attempt(
                3,
                "install",
                "started",
                None,
                "1.1.1.1",
                "Firefox",
                Some("aa"),
            ),
            attempt(
                2,
                "callback",
                "success",
                None,
                "2.2.2.2",
                "Chrome",
                Some("bb"),
            ),
            attempt(
                1,
                "install",
                "started",
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
