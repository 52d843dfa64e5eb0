//! `/amocrm/install` and `/amocrm/callback`: thin wrappers around the flow.

use std::net::IpAddr;

use axum::Extension;
use axum::extract::{Query, RawQuery, State};
use axum::http::header::{CONTENT_SECURITY_POLICY, LOCATION, USER_AGENT};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;

use super::auth::Admin;
use super::client::ClientIp;
use super::pages::{self, Lang};
use super::{AppState, store_unavailable};
use crate::amocrm::{AmoError, ConsentMode};
use crate::flow::{
    CallbackError, CallbackOutcome, InstallError, InstallRequest, Requester, ReturnTo,
};
use crate::metrics::Count;

pub(super) fn requester(peer: IpAddr, headers: &HeaderMap) -> Requester {
    Requester {
        ip: Some(peer.to_string()),
        user_agent: headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

#[derive(Deserialize)]
pub struct InstallQuery {
    subdomain: Option<String>,
    /// A value other than `popup` or `post_message` is refused by the extractor (400).
    #[serde(default)]
    mode: ConsentMode,
}

pub async fn install(
    _admin: Admin,
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    Query(query): Query<InstallQuery>,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let request = InstallRequest {
        subdomain: query.subdomain.as_deref(),
        mode: query.mode,
        external_id: None,
        return_url: None,
    };
    match state
        .flow
        .start_install(&request, &requester(peer, &headers))
        .await
    {
        Ok((consent, _)) => {
            state.metrics.count(Count::FlowStarted);
            (StatusCode::SEE_OTHER, [(LOCATION, consent.to_string())]).into_response()
        }
        Err(InstallError::Store(err)) => store_unavailable(lang, &err),
        Err(err) => {
            let page = pages::error(lang, "Неверный запрос", "Invalid request", &err.to_string());
            (StatusCode::BAD_REQUEST, Html(page.into_string())).into_response()
        }
    }
}

pub async fn callback(
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let requester = requester(peer, &headers);
    let callback = state
        .flow
        .callback(query.as_deref().unwrap_or_default(), &requester)
        .await;
    match &callback.result {
        Ok(CallbackOutcome::Connected(connected)) => {
            tracing::Span::current().record("account", connected.account_id);
            state.metrics.count(Count::FlowCompleted);
        }
        Ok(CallbackOutcome::WidgetAccepted) => {}
        Err(err) => {
            if let CallbackError::Store(store_err) = err {
                tracing::error!(error = %store_err, "callback failed on the database");
            }
            state.metrics.count(Count::FlowFailed(err.reason()));
        }
    }
    if let Some(return_to) = &callback.return_to {
        return report_to_host_app(lang, return_to, &callback.result);
    }
    match callback.result {
        Ok(CallbackOutcome::Connected(connected)) => {
            Html(pages::connected(lang, &connected).into_string()).into_response()
        }
        // amoCRM ignores the answer to a widget install; a short text helps whoever debugs it.
        Ok(CallbackOutcome::WidgetAccepted) => (StatusCode::OK, "accepted\n").into_response(),
        Err(err) => (
            status_of(&err),
            Html(pages::callback_error(lang, &err).into_string()),
        )
            .into_response(),
    }
}

/// A connect link's outcome goes back to the host app: `return_url` gets `amoauth_status`
/// (`connected` or `error`), `account_id` or `reason`, and `external_id`; in `post_message`
/// mode the page posts the same to the opener window, to `return_url`'s origin only.
fn report_to_host_app(
    lang: Lang,
    return_to: &ReturnTo,
    result: &Result<CallbackOutcome, CallbackError>,
) -> Response {
    let mut report: Vec<(&str, String)> = match result {
        Ok(CallbackOutcome::Connected(connected)) => vec![
            ("amoauth_status", "connected".into()),
            ("account_id", connected.account_id.to_string()),
        ],
        Ok(CallbackOutcome::WidgetAccepted) => vec![("amoauth_status", "connected".into())],
        Err(err) => vec![
            ("amoauth_status", "error".into()),
            ("reason", err.reason().as_str().into()),
        ],
    };
    if let Some(external_id) = &return_to.external_id {
        report.push(("external_id", external_id.clone()));
    }
    let Ok(mut url) = url::Url::parse(&return_to.url) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored return_url is invalid\n",
        )
            .into_response();
    };
    match return_to.mode {
        ConsentMode::PostMessage => {
            let origin = url.origin().ascii_serialization();
            let message: serde_json::Map<String, serde_json::Value> = report
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.into()))
                .collect();
            let (page, script) = pages::post_message(lang, &origin, &message.into(), url.as_str());
            let policy = pages::content_security_policy(Some(&script));
            (
                [(CONTENT_SECURITY_POLICY, policy)],
                Html(page.into_string()),
            )
                .into_response()
        }
        ConsentMode::Popup => {
            url.query_pairs_mut()
                .extend_pairs(report.iter().map(|(k, v)| (*k, v.as_str())));
            (StatusCode::SEE_OTHER, [(LOCATION, url.to_string())]).into_response()
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
