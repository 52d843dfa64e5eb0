//! The sandbox's HTTP surface: consent page and decision, token endpoint, `/api/v4/account`,
//! host rediscovery by refresh token, problem+json errors shaped like amoCRM's, fault injection
//! and the request counter.

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{Form, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use url::Url;

use super::state::{ApiError, CURRENT_USER_ID, GrantType, TokenError, TokenRequest};
use super::{Fault, Sandbox, SandboxAccount, page};

const OAUTH_PROBLEM_TYPE: &str = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson";
const BAD_REQUEST_TITLE: &str = "Некорректный запрос";
const BAD_REQUEST_DETAIL: &str = "В запросе отсутствует ряд параметров или параметры невалидны";
/// The sandbox has no real account history; a fixed creation date keeps answers stable.
const ACCOUNT_CREATED_AT: i64 = 1_600_000_000;
/// How long a `Fault::LoseReply` answer is held back: far longer than any client waits.
const LOST_REPLY_HOLD: Duration = Duration::from_secs(3600);
/// amoCRM's header carrying the refresh token for host rediscovery.
const REFRESH_TOKEN_HEADER: &str = "x-refresh-token";

pub(super) fn router(sandbox: Sandbox) -> Router {
    Router::new()
        // amoCRM's own league provider links to `/oauth/`, the docs to `/oauth`.
        .route("/oauth", get(consent))
        .route("/oauth/", get(consent))
        .route("/oauth/decide", post(decide))
        .route("/oauth2/access_token", post(access_token))
        .route("/api/v4/account", get(account))
        // amoCRM serves this on the shared `api_domain` host; the sandbox on any host.
        .route("/oauth2/account/current/subdomain", get(current_subdomain))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            sandbox.clone(),
            count_request,
        ))
        .with_state(sandbox)
}

async fn count_request(State(sandbox): State<Sandbox>, request: Request, next: Next) -> Response {
    sandbox.state().stats.requests += 1;
    next.run(request).await
}

/// amoCRM-style problem+json body; `hint` is what clients classify errors by.
#[derive(Serialize)]
struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    hint: Option<String>,
    title: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    status: u16,
    detail: &'static str,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            [(CONTENT_TYPE, "application/problem+json")],
            axum::Json(self),
        )
            .into_response()
    }
}

fn oauth_problem(status: u16, hint: Option<String>) -> Problem {
    Problem {
        hint,
        title: BAD_REQUEST_TITLE,
        kind: OAUTH_PROBLEM_TYPE,
        status,
        detail: BAD_REQUEST_DETAIL,
    }
}

/// amoCRM's answer at a host that serves no account of the grant or token.
fn account_not_found() -> Problem {
    http_problem(StatusCode::NOT_FOUND, "Not Found", "Account not found")
}

/// The shape amoCRM uses outside OAuth (`/api/v4/...`, unknown paths).
fn http_problem(status: StatusCode, title: &'static str, detail: &'static str) -> Problem {
    Problem {
        hint: None,
        title,
        kind: match status {
            StatusCode::UNAUTHORIZED => "https://httpstatus.es/401",
            StatusCode::METHOD_NOT_ALLOWED => "https://httpstatus.es/405",
            _ => "https://httpstatus.es/404",
        },
        status: status.as_u16(),
        detail,
    }
}

impl IntoResponse for TokenError {
    fn into_response(self) -> Response {
        match self {
            TokenError::InvalidClient => Problem {
                hint: None,
                title: "Некорректный клиент",
                kind: OAUTH_PROBLEM_TYPE,
                status: StatusCode::UNAUTHORIZED.as_u16(),
                detail: "Авторизация клиента не прошла",
            },
            TokenError::Invalid { status, hint } => {
                oauth_problem(status.as_u16(), Some(hint.to_owned()))
            }
            TokenError::AccountNotFound => account_not_found(),
        }
        .into_response()
    }
}

/// Plays an injected fault before the request is handled: `Some` is the answer to send
/// instead, `None` means go on (after sleeping, for a delay). `LoseReply` acts after handling,
/// in `deliver`.
pub(super) async fn play(fault: Option<&Fault>) -> Option<Response> {
    match fault? {
        Fault::Problem { status, hint } => {
            Some(oauth_problem(*status, Some(hint.clone())).into_response())
        }
        Fault::ServerError => {
            Some((StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error").into_response())
        }
        Fault::Garbage => Some(Html("<html>oops</html>").into_response()),
        Fault::Delay(delay) => {
            tokio::time::sleep(*delay).await;
            None
        }
        Fault::LoseReply | Fault::ExpiresIn(_) => None,
    }
}

/// Sends the handled request's answer, or for `LoseReply` holds it back until the client has
/// long given up. The state lock is not held here: other requests go on meanwhile.
pub(super) async fn deliver(fault: Option<&Fault>, response: Response) -> Response {
    if matches!(fault, Some(Fault::LoseReply)) {
        tokio::time::sleep(LOST_REPLY_HOLD).await;
    }
    response
}

/// The `Host` header as amoCRM routes by it: lowercase, without port or trailing dot. `None`
/// if absent or malformed; such requests are not host-checked.
pub(super) fn request_host(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(HOST)?.to_str().ok()?;
    let authority = value.parse::<Authority>().ok()?;
    Some(authority.host().trim_end_matches('.').to_ascii_lowercase())
}

fn error_page(status: StatusCode, message: &str) -> Response {
    (status, Html(page::error(message).into_string())).into_response()
}

#[derive(Deserialize)]
struct ConsentQuery {
    client_id: Option<String>,
    state: Option<String>,
    mode: Option<String>,
}

/// `GET /oauth`: the consent page.
async fn consent(
    State(sandbox): State<Sandbox>,
    query: Result<Query<ConsentQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error_page(StatusCode::BAD_REQUEST, "Некорректные параметры запроса.");
    };
    let config = sandbox.config();
    let integration = match query.client_id.as_deref() {
        Some(id) if config.integration(id).is_some() => config.integration(id),
        Some(id) if !id.is_empty() => {
            return error_page(
                StatusCode::BAD_REQUEST,
                &format!("Интеграция с client_id «{id}» не найдена."),
            );
        }
        _ => return error_page(StatusCode::BAD_REQUEST, "Не указан client_id интеграции."),
    };
    let Some(integration) = integration else {
        return error_page(StatusCode::BAD_REQUEST, "Не указан client_id интеграции.");
    };
    // Each platform's consent page offers only its own accounts.
    let accounts: Vec<_> = sandbox
        .state()
        .accounts()
        .iter()
        .filter(|account| config.serves(integration, account))
        .cloned()
        .collect();
    let markup = page::consent(
        integration.client_id,
        &accounts,
        non_empty(&query.state),
        non_empty(&query.mode),
    );
    Html(markup.into_string()).into_response()
}

/// amoCRM returns `state` only "if it was sent"; a blank one counts as not sent.
fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|v| !v.is_empty())
}

#[derive(Deserialize)]
struct DecisionForm {
    client_id: Option<String>,
    state: Option<String>,
    account_id: Option<String>,
    decision: Option<String>,
}

/// `POST /oauth/decide`: the user's Allow or Deny, answered with amoCRM's redirect.
async fn decide(
    State(sandbox): State<Sandbox>,
    form: Result<Form<DecisionForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return error_page(StatusCode::BAD_REQUEST, "Некорректные параметры формы.");
    };
    let config = sandbox.config();
    let Some(integration) = form
        .client_id
        .as_deref()
        .and_then(|id| config.integration(id))
    else {
        return error_page(StatusCode::BAD_REQUEST, "Интеграция не найдена.");
    };
    let Ok(mut location) = Url::parse(integration.redirect_uri) else {
        return error_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Redirect URI интеграции не является корректным адресом.",
        );
    };
    let state = non_empty(&form.state);
    match form.decision.as_deref() {
        Some("allow") => {
            let account_id = form
                .account_id
                .as_deref()
                .and_then(|id| id.parse::<i64>().ok());
            // Code and referer under one lock, so a concurrent rename cannot split them.
            let issued = account_id.and_then(|id| {
                let mut state = sandbox.state();
                // A code only for an account of the integration's own platform.
                let host = state
                    .account(id)
                    .filter(|account| config.serves(integration, account))
                    .map(SandboxAccount::host)?;
                Some((state.issue_code(id)?, host))
            });
            let Some((code, host)) = issued else {
                return error_page(StatusCode::BAD_REQUEST, "Выберите аккаунт.");
            };
            let mut query = location.query_pairs_mut();
            query.append_pair("code", &code);
            if let Some(state) = state {
                query.append_pair("state", state);
            }
            query
                .append_pair("referer", &host)
                .append_pair("client_id", integration.client_id);
        }
        Some("deny") => {
            let mut query = location.query_pairs_mut();
            query
                .append_pair("error", "access_denied")
                .append_pair("client_id", integration.client_id);
            if let Some(state) = state {
                query.append_pair("state", state);
            }
        }
        _ => return error_page(StatusCode::BAD_REQUEST, "Неизвестное решение."),
    }
    (StatusCode::FOUND, [(LOCATION, location.to_string())]).into_response()
}

/// Parses the token request body by its Content-Type, as amoCRM accepts JSON or a form;
/// the error is the hint for the 400 answer.
fn parse_token_request(headers: &HeaderMap, body: &[u8]) -> Result<TokenRequest, &'static str> {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" {
        serde_json::from_slice(body).map_err(|_| "The request body is not valid JSON")
    } else if mime == "application/x-www-form-urlencoded" {
        // Through a JSON map, so JSON and forms share one definition of the fields.
        let fields: serde_json::Map<String, serde_json::Value> = url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), serde_json::Value::String(v.into_owned())))
            .collect();
        serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|_| "The request body is not a valid form")
    } else {
        Err("Send the body as application/json or application/x-www-form-urlencoded")
    }
}

/// `POST /oauth2/access_token`: code exchange and refresh.
async fn access_token(State(sandbox): State<Sandbox>, headers: HeaderMap, body: Bytes) -> Response {
    let request = parse_token_request(&headers, &body);
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let grant_type = request
        .as_ref()
        .ok()
        .and_then(|r| r.grant_type.as_deref())
        .and_then(GrantType::parse);
    let fault = {
        let mut state = sandbox.state();
        state.note_token_request(host, grant_type);
        state.token_fault.clone()
    };
    if let Some(response) = play(fault.as_ref()).await {
        return response;
    }
    let response = match request {
        Ok(request) => {
            let host = request_host(&headers);
            let outcome = sandbox
                .state()
                .token(sandbox.config(), &request, host.as_deref());
            match outcome {
                Ok(grant) => match fault {
                    Some(Fault::ExpiresIn(secs)) => axum::Json(grant.announcing(secs)),
                    _ => axum::Json(grant),
                }
                .into_response(),
                Err(error) => error.into_response(),
            }
        }
        Err(hint) => oauth_problem(400, Some(hint.to_owned())).into_response(),
    };
    deliver(fault.as_ref(), response).await
}

/// `GET /api/v4/account`: the account behind the Bearer token.
async fn account(State(sandbox): State<Sandbox>, headers: HeaderMap) -> Response {
    let fault = {
        let mut state = sandbox.state();
        state.stats.account_lookups += 1;
        state.account_fault.clone()
    };
    if let Some(response) = play(fault.as_ref()).await {
        return response;
    }
    let response = account_answer(&sandbox, &headers);
    deliver(fault.as_ref(), response).await
}

fn account_answer(sandbox: &Sandbox, headers: &HeaderMap) -> Response {
    let token = bearer_token(headers);
    let host = request_host(headers);
    let account = token
        .ok_or(ApiError::Unauthorized)
        .and_then(|t| sandbox.state().account_for_access_token(t, host.as_deref()));
    let account = match account {
        Ok(account) => account,
        Err(ApiError::Unauthorized) => {
            return http_problem(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "The access token is missing, invalid or expired",
            )
            .into_response();
        }
        Err(ApiError::AccountNotFound) => return account_not_found().into_response(),
    };
    let body = serde_json::json!({
        "id": account.id,
        "name": account.name,
        "subdomain": account.subdomain,
        "created_at": ACCOUNT_CREATED_AT,
        "created_by": 0,
        "updated_at": ACCOUNT_CREATED_AT,
        "updated_by": 0,
        "current_user_id": CURRENT_USER_ID,
        "country": "RU",
        "currency": "RUB",
        "currency_symbol": "₽",
        "customers_mode": "disabled",
        "is_unsorted_on": true,
        "mobile_feature_version": 0,
        "is_loss_reason_enabled": true,
        "is_helpbot_enabled": false,
        "is_technical_account": false,
        "contact_name_display_order": 1,
        "_links": { "self": { "href": format!("https://{}/api/v4/account", account.host()) } },
    });
    ([(CONTENT_TYPE, "application/hal+json")], axum::Json(body)).into_response()
}

/// `GET /oauth2/account/current/subdomain`: the current host of the account behind the
/// refresh token in `X-Refresh-Token`, so a client can find an account that was renamed.
async fn current_subdomain(State(sandbox): State<Sandbox>, headers: HeaderMap) -> Response {
    let token = headers
        .get(REFRESH_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let account = {
        let mut state = sandbox.state();
        state.stats.subdomain_lookups += 1;
        token.and_then(|t| state.account_for_refresh_token(t))
    };
    let Some(account) = account else {
        return http_problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "The refresh token is missing, invalid, revoked or expired",
        )
        .into_response();
    };
    let top_level_domain = account
        .domain
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    axum::Json(serde_json::json!({
        "id": account.id,
        "subdomain": account.subdomain,
        "domain": account.host(),
        "top_level_domain": top_level_domain,
    }))
    .into_response()
}

async fn not_found() -> Response {
    http_problem(
        StatusCode::NOT_FOUND,
        "Not Found",
        "No such endpoint in the amoCRM sandbox",
    )
    .into_response()
}

async fn method_not_allowed() -> Response {
    http_problem(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method Not Allowed",
        "This endpoint does not accept this method",
    )
    .into_response()
}

/// The `Bearer` token of the `Authorization` header, if any.
pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"))
        .map(|(_, token)| token.trim())
}
