//! The JSON API for the host app's services: connections and fresh access tokens.

use axum::Extension;
use axum::Json;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::header::{AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::api_error::{body_rejected, error};
use super::client::ClientIp;
use super::oauth::requester;
use crate::amocrm::ConsentMode;
use crate::api_keys::{self, PresentedKey};
use crate::flow::{InstallError, InstallRequest, MAX_EXTERNAL_ID, is_valid_external_id};
use crate::metrics::{Count, TokenApiOutcome};
use crate::store::{ConnectionRow, rfc3339};
use crate::tokens::TokenError;

/// Proof that the request carries an active API key.
pub struct ApiKey;

impl FromRequestParts<AppState> for ApiKey {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let presented = Presented::from_request_parts(parts, state).await?;
        match api_keys::verify(&state.store, presented.0.as_str()).await {
            Ok(true) => Ok(ApiKey),
            Ok(false) => Err(unauthorized(state)),
            Err(err) => Err(database_unavailable(&err.to_string())),
        }
    }
}

/// The API key a request presents, not yet checked: the token route checks it in the
/// statement that reads the connection.
pub struct Presented(String);

impl FromRequestParts<AppState> for Presented {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| Self(key.trim().to_owned()))
            .ok_or_else(|| unauthorized(state))
    }
}

/// The 401 for a missing, malformed, unknown or revoked key, counted.
fn unauthorized(state: &AppState) -> Response {
    state
        .metrics
        .count(Count::TokenApiRequest(TokenApiOutcome::Unauthorized));
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send `Authorization: Bearer <API key>`; create keys with `amoauth api-key create NAME`",
    );
    response
        .headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

pub(super) fn database_unavailable(detail: &str) -> Response {
    tracing::error!(error = %detail, "database unavailable");
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
        "amoauth cannot reach its database; try again shortly",
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

#[derive(Serialize)]
struct ConnectionJson {
    platform: &'static str,
    account_id: Option<i64>,
    external_id: Option<String>,
    account_name: Option<String>,
    subdomain: String,
    domain: String,
    status: &'static str,
    expires_at: String,
    last_refresh_at: Option<String>,
    last_error: Option<String>,
}

impl From<ConnectionRow> for ConnectionJson {
    fn from(row: ConnectionRow) -> Self {
        Self {
            platform: row.platform.as_str(),
            account_id: row.account_id,
            external_id: row.external_id,
            account_name: row.account_name,
            subdomain: row.subdomain,
            domain: row.domain,
            status: row.status.as_str(),
            expires_at: rfc3339(row.expires_at),
            last_refresh_at: row.last_refresh_at.map(rfc3339),
            last_error: row.last_error,
        }
    }
}

#[derive(Deserialize)]
pub struct ConnectionsQuery {
    external_id: Option<String>,
}

/// All connections, or one tenant's with `?external_id=`.
pub async fn connections(
    _key: ApiKey,
    State(state): State<AppState>,
    Query(query): Query<ConnectionsQuery>,
) -> Response {
    if let Some(external_id) = &query.external_id
        && !is_valid_external_id(external_id)
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("`external_id` must be 1 to {MAX_EXTERNAL_ID} characters, none of them NUL"),
        );
    }
    let store = &state.store;
    let rows = match &query.external_id {
        Some(external_id) => store.connections_of(external_id).await,
        None => store.connections().await,
    };
    match rows {
        Ok(rows) => Json(
            rows.into_iter()
                .map(ConnectionJson::from)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(err) => database_unavailable(&err.to_string()),
    }
}

#[derive(Deserialize)]
pub struct ConnectLinkRequest {
    external_id: String,
    return_url: String,
    /// `popup` (default: the browser is redirected to `return_url`) or `post_message`.
    #[serde(default)]
    mode: ConsentMode,
    /// Absent or a string; `null` is refused, as for `mode`.
    #[serde(default, deserialize_with = "string_if_present")]
    subdomain: Option<String>,
    /// `amocrm` or `kommo`; absent: the configured one, or amoCRM when both are.
    #[serde(default, deserialize_with = "string_if_present")]
    platform: Option<String>,
}

/// An optional field that, when present, must be a string (not `null`).
fn string_if_present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

/// A link that takes a host app's user through amoCRM's consent and back to `return_url`.
pub async fn connect_link(
    _key: ApiKey,
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    headers: HeaderMap,
    body: Result<Json<ConnectLinkRequest>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => return body_rejected(&rejection),
    };
    let request = InstallRequest {
        subdomain: body.subdomain.as_deref(),
        mode: body.mode,
        external_id: Some(&body.external_id),
        return_url: Some(&body.return_url),
        platform: body.platform.as_deref(),
    };
    match state
        .flow
        .start_install(&request, &requester(peer, &headers))
        .await
    {
        Ok((url, expires_at, platform)) => {
            state.metrics.count(Count::FlowStarted(platform));
            (
                StatusCode::CREATED,
                Json(json!({ "url": url.as_str(), "expires_at": rfc3339(expires_at) })),
            )
                .into_response()
        }
        Err(InstallError::Store(err)) => database_unavailable(&err.to_string()),
        Err(err @ InstallError::ReturnUrlNotAllowed) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "return_url_not_allowed",
            err.to_string(),
        ),
        Err(err @ InstallError::PlatformNotConfigured { .. }) => error(
            StatusCode::BAD_REQUEST,
            "platform_not_configured",
            err.to_string(),
        ),
        Err(err) => error(StatusCode::BAD_REQUEST, "invalid_request", err.to_string()),
    }
}

/// The token route's answer, serialized as it is (no intermediate JSON tree), its fields in
/// the order the other answers' maps give them.
#[derive(Serialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    account_id: Option<i64>,
    domain: &'a str,
    expires_at: String,
    platform: &'static str,
    subdomain: &'a str,
}

/// A valid access token for the account (id or subdomain). Never a refresh token.
pub async fn token(
    presented: Presented,
    State(state): State<AppState>,
    Path(account): Path<String>,
) -> Response {
    let Some(key) = PresentedKey::parse(&presented.0) else {
        return unauthorized(&state);
    };
    if let Some(refused) = account_invalid(&account) {
        // The key is checked first, as on every route of the API.
        return match key.is_active(&state.store).await {
            Ok(true) => refused,
            Ok(false) => unauthorized(&state),
            Err(err) => database_unavailable(&err.to_string()),
        };
    }
    tracing::Span::current().record("account", account.as_str());
    let result = match state.tokens.access_token_for_key(&key, &account).await {
        Ok(Some(token)) => Ok(token),
        Ok(None) => return unauthorized(&state),
        Err(err) => Err(err),
    };
    let outcome = match &result {
        Ok(_) => TokenApiOutcome::Ok,
        Err(TokenError::NotFound(_)) => TokenApiOutcome::NotFound,
        Err(TokenError::NeedsReauth { .. } | TokenError::Disconnected) => {
            TokenApiOutcome::NeedsReauth
        }
        Err(_) => TokenApiOutcome::Error,
    };
    state.metrics.count(Count::TokenApiRequest(outcome));
    match result {
        Ok(token) => Json(TokenAnswer {
            access_token: token.access_token.expose(),
            account_id: token.account_id,
            domain: &token.domain,
            expires_at: rfc3339(token.expires_at),
            platform: token.platform.as_str(),
            subdomain: &token.subdomain,
        })
        .into_response(),
        Err(err) => token_error(&err),
    }
}

/// Longest `{account}`: an account host is at most a DNS name's 253 characters.
pub const MAX_ACCOUNT: usize = 253;

/// The 400 for an `{account}` that cannot name one, or None when it can.
pub(super) fn account_invalid(account: &str) -> Option<Response> {
    let valid =
        !account.is_empty() && account.chars().count() <= MAX_ACCOUNT && !account.contains('\0');
    (!valid).then(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "`account` must be an account id or subdomain of 1 to {MAX_ACCOUNT} characters, none of them NUL"
            ),
        )
    })
}

pub(super) fn token_error(err: &TokenError) -> Response {
    match err {
        TokenError::NotFound(_) => error(StatusCode::NOT_FOUND, "not_found", err.to_string()),
        TokenError::Ambiguous { .. } => error(StatusCode::CONFLICT, "ambiguous_account", err.to_string()),
        TokenError::NeedsReauth { reason } => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": "needs_reauth",
                "reason": reason,
                "message": "amoCRM no longer accepts this connection's refresh token; an admin must connect the account again at /amocrm/install",
            })),
        )
            .into_response(),
        TokenError::Disconnected => error(StatusCode::CONFLICT, "disconnected", "the integration was uninstalled in amoCRM; connect the account again at /amocrm/install"),
        TokenError::Amo { timeout: true, .. } => error(StatusCode::GATEWAY_TIMEOUT, "refresh_failed", err.to_string()),
        TokenError::Amo { .. } => error(StatusCode::BAD_GATEWAY, "refresh_failed", err.to_string()),
        TokenError::Busy => {
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, "busy", err.to_string());
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("2"));
            response
        }
        TokenError::BackingOff {
            reason, retry_at, ..
        } => {
            // Whole seconds, rounded up: a client that waits this long finds the backoff over.
            let wait_ms = (*retry_at - crate::store::now()).num_milliseconds().max(0);
            let seconds = (wait_ms + 999) / 1000;
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": "refresh_backoff",
                    "reason": reason,
                    "message": err.to_string(),
                })),
            )
                .into_response();
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            response
        }
        TokenError::Database(detail) => database_unavailable(detail),
        TokenError::Corrupt(_) => {
            tracing::error!(error = %err, "stored tokens cannot be decrypted");
            error(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", err.to_string())
        }
    }
}
