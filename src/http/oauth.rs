//! `/amocrm/install` and `/amocrm/callback`: thin wrappers around the flow.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, RawQuery, State};
use axum::http::header::{LOCATION, USER_AGENT};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::auth::Admin;
use super::pages::{self, Lang};
use super::{AppState, store_unavailable};
use crate::amocrm::{AmoError, ConsentMode};
use crate::flow::{CallbackError, CallbackOutcome, InstallError, Requester};

pub(super) fn requester(peer: SocketAddr, headers: &HeaderMap) -> Requester {
    Requester {
        ip: Some(peer.ip().to_string()),
        user_agent: headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

#[derive(Deserialize)]
pub struct InstallQuery {
    subdomain: Option<String>,
    mode: Option<String>,
}

pub async fn install(
    _admin: Admin,
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<InstallQuery>,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let mode = match query.mode.as_deref() {
        None | Some("popup") => ConsentMode::Popup,
        Some("post_message") => ConsentMode::PostMessage,
        Some(_) => {
            let page = pages::error(
                lang,
                "Неверный запрос",
                "Invalid request",
                "mode: popup | post_message",
            );
            return (StatusCode::BAD_REQUEST, Html(page.into_string())).into_response();
        }
    };
    match state
        .flow
        .start_install(query.subdomain.as_deref(), mode, &requester(peer, &headers))
        .await
    {
        Ok(consent) => (StatusCode::SEE_OTHER, [(LOCATION, consent.to_string())]).into_response(),
        Err(InstallError::BadSubdomain) => {
            let page = pages::error(
                lang,
                "Неверный запрос",
                "Invalid request",
                &InstallError::BadSubdomain.to_string(),
            );
            (StatusCode::BAD_REQUEST, Html(page.into_string())).into_response()
        }
        Err(InstallError::Store(err)) => store_unavailable(lang, &err),
    }
}

pub async fn callback(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let requester = requester(peer, &headers);
    match state
        .flow
        .callback(query.as_deref().unwrap_or_default(), &requester)
        .await
    {
        Ok(CallbackOutcome::Connected(connected)) => {
            Html(pages::connected(lang, &connected).into_string()).into_response()
        }
        // amoCRM ignores the answer to a widget install; a short text helps whoever debugs it.
        Ok(CallbackOutcome::WidgetAccepted) => (StatusCode::OK, "accepted\n").into_response(),
        Err(err) => {
            if let CallbackError::Store(store_err) = &err {
                tracing::error!(error = %store_err, "callback failed on the database");
            }
            (
                status_of(&err),
                Html(pages::callback_error(lang, &err).into_string()),
            )
                .into_response()
        }
    }
}

/// 4xx for bad or hostile requests, 502/504 when amoCRM fails, 503 when our database does.
fn status_of(err: &CallbackError) -> StatusCode {
    match err {
        CallbackError::AccessDenied | CallbackError::WidgetInstallsOff => StatusCode::FORBIDDEN,
        CallbackError::AmoCrmReportedError(_)
        | CallbackError::InvalidRequest(_)
        | CallbackError::BadReferer
        | CallbackError::UnknownState => StatusCode::BAD_REQUEST,
        CallbackError::UsedState => StatusCode::CONFLICT,
        CallbackError::ExpiredState => StatusCode::GONE,
        CallbackError::Exchange { source, .. } | CallbackError::AccountLookup { source, .. } => {
            match source {
                AmoError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            }
        }
        CallbackError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    }
}
