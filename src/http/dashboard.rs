//! The admin dashboard: connections at a glance, recent attempts with suspicious ones marked,
//! and the refresh-now and disconnect actions (POST with a CSRF token).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::header::LOCATION;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::auth::{Admin, csrf_field};
use super::pages::{self, Lang};
use super::suspicion::suspicions;
use super::{AppState, local, store_unavailable};
use crate::store::{ConnectionRow, StoreError, now};

/// Attempts shown on the dashboard; more are read to find each callback's install.
const SHOWN_ATTEMPTS: usize = 30;
const SCANNED_ATTEMPTS: i64 = 300;

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
    let store = &state.store;
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
        &state.flow.platforms(),
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
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lang = Lang::from_headers(&headers);
    if !admin.csrf_ok(csrf_field(&body).as_deref(), &state.admin_token) {
        return refuse_csrf(lang);
    }
    let row = match the_connection(&state, &account).await {
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
    Path(account): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let lang = Lang::from_headers(&headers);
    if !admin.csrf_ok(csrf_field(&body).as_deref(), &state.admin_token) {
        return refuse_csrf(lang);
    }
    let (platform, account_id) = match the_connection(&state, &account).await {
        Ok(Some(ConnectionRow {
            platform,
            account_id: Some(account_id),
            ..
        })) => (platform, account_id),
        Ok(_) => return back_to_dashboard("not_found"),
        Err(err) => return store_unavailable(lang, &err),
    };
    match state.flow.disconnect(platform, account_id).await {
        Ok(_) => {
            tracing::info!(
                platform = platform.as_str(),
                account_id,
                "disconnected from the dashboard"
            );
            back_to_dashboard("disconnected")
        }
        Err(err) => store_unavailable(lang, &err),
    }
}

/// The one connection the dashboard's button names: `{platform}:{account id}`, or a bare
/// account id that only one platform has.
async fn the_connection(
    state: &AppState,
    account: &str,
) -> Result<Option<ConnectionRow>, StoreError> {
    let mut rows = state.store.find_connections(account).await?;
    Ok(match rows.len() {
        1 => rows.pop(),
        _ => None,
    })
}
