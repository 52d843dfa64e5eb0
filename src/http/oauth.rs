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
    CallbackError, CallbackOutcome, Failure, InstallError, InstallRequest, Requester, ReturnTo,
    Settled,
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
    /// `amocrm` or `kommo`; default: the configured one, or amoCRM when both are.
    platform: Option<String>,
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
        platform: query.platform.as_deref(),
    };
    match state
        .flow
        .start_install(&request, &requester(peer, &headers))
        .await
    {
        Ok((consent, _, platform)) => {
            state.metrics.count(Count::FlowStarted(platform));
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
            state
                .metrics
                .count(Count::FlowCompleted(connected.platform));
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
        return report_to_host_app(&state, return_to, &callback.result);
    }
    match callback.result {
        // amoCRM ignores the answer to a widget install; a short text helps whoever debugs it.
        Ok(CallbackOutcome::WidgetAccepted) => (StatusCode::OK, "accepted\n").into_response(),
        Ok(CallbackOutcome::Connected(connected)) => {
            redirect_to_result(&state, Settled::Connected(connected))
        }
        Err(err) if is_settled(&err, callback.state_consumed) => {
            redirect_to_result(&state, Settled::Failed(Failure::from(&err)))
        }
        Err(err) => failure_page(lang, &Failure::from(&err)),
    }
}

/// Whether a failed callback's page moves to the result address, so that a reload shows it
/// again instead of running the callback once more. Refusals of the request itself (its
/// parameters, its referer, a widget install while they are off) are answered in place:
/// repeating them repeats the same refusal, and probes get their 4xx at once. So is a database
/// failure before the state was consumed: the state is intact, and a reload once the database
/// is back completes the install.
fn is_settled(err: &CallbackError, state_consumed: bool) -> bool {
    match err {
        CallbackError::InvalidRequest(_)
        | CallbackError::BadReferer
        | CallbackError::WidgetInstallsOff => false,
        CallbackError::Store(_) => state_consumed,
        _ => true,
    }
}

/// Where a finished callback's page lives: under /amocrm/ whatever the base path, beside the
/// callback, so a site proxy that routes the callback routes it too.
pub const RESULT_PATH: &str = "/amocrm/callback/result";

/// Post/Redirect/Get: 303 to the result address, which holds neither the code nor the state;
/// relative, so the browser stays on the public origin behind a proxy.
fn redirect_to_result(state: &AppState, settled: Settled) -> Response {
    let token = state.flow.seal_result(settled);
    let location = format!("{RESULT_PATH}?r={token}");
    (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
}

/// `GET /amocrm/callback/result?r=…`: the page of a finished callback, as often as the browser
/// asks while the token lives. Nothing is run, audited or counted again.
pub async fn callback_result(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let query = query.unwrap_or_default();
    let settled = url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "r")
        .and_then(|(_, token)| state.flow.open_result(&token));
    match settled {
        Some(Settled::Connected(connected)) => {
            Html(pages::connected(lang, &connected).into_string()).into_response()
        }
        Some(Settled::Failed(failure)) => failure_page(lang, &failure),
        Some(Settled::PostMessage { return_url, report }) => {
            post_message_page(lang, &return_url, report)
        }
        // Expired or altered: not a failed install, so a neutral page pointing to the dashboard.
        None => (
            StatusCode::GONE,
            Html(pages::result_gone(lang).into_string()),
        )
            .into_response(),
    }
}

fn failure_page(lang: Lang, failure: &Failure) -> Response {
    (
        status_of(failure),
        Html(pages::callback_error(lang, failure).into_string()),
    )
        .into_response()
}

/// A connect link's outcome goes back to the host app: `return_url` gets `amoauth_status`
/// (`connected` or `error`), `account_id` or `reason`, and `external_id`; in `post_message`
/// mode the page (served from the result address, so a reload posts the same again) posts the
/// same to the opener window, to `return_url`'s origin only.
fn report_to_host_app(
    state: &AppState,
    return_to: &ReturnTo,
    result: &Result<CallbackOutcome, CallbackError>,
) -> Response {
    let mut report: Vec<(String, String)> = match result {
        Ok(CallbackOutcome::Connected(connected)) => vec![
            ("amoauth_status".into(), "connected".into()),
            ("account_id".into(), connected.account_id.to_string()),
        ],
        Ok(CallbackOutcome::WidgetAccepted) => {
            vec![("amoauth_status".into(), "connected".into())]
        }
        Err(err) => vec![
            ("amoauth_status".into(), "error".into()),
            ("reason".into(), err.reason().as_str().into()),
        ],
    };
    if let Some(external_id) = &return_to.external_id {
        report.push(("external_id".into(), external_id.clone()));
    }
    let Ok(mut url) = url::Url::parse(&return_to.url) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored return_url is invalid\n",
        )
            .into_response();
    };
    match return_to.mode {
        ConsentMode::PostMessage => redirect_to_result(
            state,
            Settled::PostMessage {
                return_url: url.into(),
                report,
            },
        ),
        ConsentMode::Popup => {
            url.query_pairs_mut().extend_pairs(report);
            (StatusCode::SEE_OTHER, [(LOCATION, url.to_string())]).into_response()
        }
    }
}

/// The `post_message` page, with a CSP that lets its one inline script run.
fn post_message_page(lang: Lang, return_url: &str, report: Vec<(String, String)>) -> Response {
    let Ok(url) = url::Url::parse(return_url) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored return_url is invalid\n",
        )
            .into_response();
    };
    let origin = url.origin().ascii_serialization();
    let message: serde_json::Map<String, serde_json::Value> = report
        .into_iter()
        .map(|(key, value)| (key, value.into()))
        .collect();
    let (page, script) = pages::post_message(lang, &origin, &message.into(), url.as_str());
    let policy = pages::content_security_policy(Some(&script));
    (
        [(CONTENT_SECURITY_POLICY, policy)],
        Html(page.into_string()),
    )
        .into_response()
}

/// 4xx for bad or hostile requests, 502/504 when amoCRM fails, 503 when our database does.
fn status_of(failure: &Failure) -> StatusCode {
    match failure {
        Failure::AccessDenied | Failure::WidgetInstallsOff => StatusCode::FORBIDDEN,
        Failure::AmoCrmReportedError(_)
        | Failure::InvalidRequest(_)
        | Failure::BadReferer
        | Failure::RefererMismatch { .. }
        | Failure::UnknownState => StatusCode::BAD_REQUEST,
        Failure::UsedState | Failure::AccountTaken => StatusCode::CONFLICT,
        Failure::ExpiredState => StatusCode::GONE,
        Failure::Exchange { source, .. } | Failure::AccountLookup { source, .. } => match source {
            AmoError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        },
        Failure::Database => StatusCode::SERVICE_UNAVAILABLE,
    }
}
