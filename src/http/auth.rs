//! Admin authentication: the Bearer admin token, or a browser session made by logging in with it.

use axum::Extension;
use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::{
    ACCEPT, AUTHORIZATION, COOKIE, LOCATION, RETRY_AFTER, SET_COOKIE, USER_AGENT, WWW_AUTHENTICATE,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use std::net::IpAddr;

use super::client::ClientIp;
use super::pages::{self, Lang};
use super::{AppState, local, store_unavailable};
use crate::config::Secret;
use crate::crypto::{constant_time_eq, hmac_sha256_hex, random_token, sha256_hex};
use crate::store::now;

const SESSION_COOKIE: &str = "amoauth_session";
const SESSION_LIFETIME: chrono::Duration = chrono::Duration::hours(12);

/// Proof that the request comes from the administrator, and how: a browser session (whose
/// forms need a CSRF token) or the Bearer admin token (no ambient credential to forge).
pub struct Admin {
    session: Option<String>,
}

impl Admin {
    /// The CSRF token for this session's forms: derived from the session, so nothing is stored.
    pub fn csrf_token(&self, admin_token: &Secret) -> Option<String> {
        self.session
            .as_deref()
            .map(|session| hmac_sha256_hex(admin_token.expose(), &format!("csrf|{session}")))
    }

    /// True when a state-changing request may proceed.
    pub fn csrf_ok(&self, presented: Option<&str>, admin_token: &Secret) -> bool {
        match self.csrf_token(admin_token) {
            None => true,
            Some(expected) => presented.is_some_and(|token| constant_time_eq(token, &expected)),
        }
    }
}

/// Why a request is not the administrator's: API clients get 401, browsers the login page.
pub enum Unauthorized {
    Api,
    Browser { next: String },
    Store(crate::store::StoreError),
}

impl IntoResponse for Unauthorized {
    fn into_response(self) -> Response {
        match self {
            Self::Api => (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Bearer")],
                "401 Unauthorized: send `Authorization: Bearer <AMOAUTH_ADMIN_TOKEN>` or log in at /login\n",
            )
                .into_response(),
            Self::Browser { next } => {
                let location = format!("{}?next={}", local("/login"), url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>());
                (StatusCode::SEE_OTHER, [(LOCATION, location)]).into_response()
            }
            Self::Store(err) => store_unavailable(Lang::Ru, &err),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Unauthorized;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(token) = bearer_token(&parts.headers) {
            return if constant_time_eq(token, state.admin_token.expose()) {
                Ok(Admin { session: None })
            } else {
                Err(Unauthorized::Api)
            };
        }
        if let Some(session) = session_cookie(&parts.headers) {
            let valid = state
                .flow
                .store()
                .session_is_valid(&sha256_hex(session), now())
                .await
                .map_err(Unauthorized::Store)?;
            if valid {
                return Ok(Admin {
                    session: Some(session.to_owned()),
                });
            }
        }
        if wants_html(&parts.headers) {
            let next = parts
                .uri
                .path_and_query()
                .map(|pq| pq.as_str())
                .unwrap_or("/")
                .to_owned();
            Err(Unauthorized::Browser { next })
        } else {
            Err(Unauthorized::Api)
        }
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
        .filter(|value| !value.is_empty())
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"))
}

/// The `csrf` field of a form body; API clients may send no body at all.
pub(super) fn csrf_field(body: &[u8]) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(name, _)| name == "csrf")
        .map(|(_, value)| value.into_owned())
}

/// Only local paths are followed after login, never another site.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(next) if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') => {
            next.to_owned()
        }
        _ => local("/"),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    /// The login URL printed at start carries the generated token.
    token: Option<String>,
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

pub async fn login_page(
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    Query(query): Query<LoginQuery>,
    headers: HeaderMap,
) -> Response {
    let lang = Lang::from_headers(&headers);
    let next = safe_next(query.next.as_deref());
    match query.token {
        Some(token) => log_in(&state, peer, &headers, &token, &next).await,
        None => Html(pages::login(lang, &next, false).into_string()).into_response(),
    }
}

pub async fn login_submit(
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    log_in(&state, peer, &headers, &form.token, &next).await
}

async fn log_in(
    state: &AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    token: &str,
    next: &str,
) -> Response {
    let lang = Lang::from_headers(headers);
    if let Some(wait) = state.login_throttle.wait(peer) {
        let seconds = wait.as_secs() + 1;
        tracing::warn!(ip = %peer, seconds, "admin login refused: too many failures");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(RETRY_AFTER, seconds.to_string())],
            Html(
                pages::error(
                    lang,
                    "Слишком много попыток",
                    "Too many attempts",
                    &format!("Try again in {seconds} s."),
                )
                .into_string(),
            ),
        )
            .into_response();
    }
    if !constant_time_eq(token, state.admin_token.expose()) {
        state.login_throttle.failed(peer);
        tracing::warn!(ip = %peer, "admin login failed");
        return (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(lang, next, true).into_string()),
        )
            .into_response();
    }
    state.login_throttle.succeeded(peer);
    // A new session id at every login; the one the browser had (if any) ends.
    if let Some(old) = session_cookie(headers)
        && let Err(err) = state.flow.store().delete_session(&sha256_hex(old)).await
    {
        return store_unavailable(lang, &err);
    }
    let session = random_token();
    let created = now();
    let user_agent = headers.get(USER_AGENT).and_then(|v| v.to_str().ok());
    let ip = peer.to_string();
    if let Err(err) = state
        .flow
        .store()
        .insert_session(
            &sha256_hex(&session),
            created,
            created + SESSION_LIFETIME,
            Some(&ip),
            user_agent,
        )
        .await
    {
        return store_unavailable(lang, &err);
    }
    tracing::info!(ip = %peer, "admin logged in");
    let secure = if state.secure_cookies { "; Secure" } else { "" };
    let cookie = format!(
        "{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        SESSION_LIFETIME.num_seconds()
    );
    let mut response = (StatusCode::SEE_OTHER, [(LOCATION, next.to_owned())]).into_response();
    response.headers_mut().insert(
        SET_COOKIE,
        HeaderValue::from_str(&cookie).expect("cookie is ASCII"),
    );
    response
}

/// Ends the session. Like every state-changing form of a session, it needs the CSRF token.
pub async fn logout(
    admin: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !admin.csrf_ok(csrf_field(&body).as_deref(), &state.admin_token) {
        return (
            StatusCode::FORBIDDEN,
            "the logout form's CSRF token is missing or wrong\n",
        )
            .into_response();
    }
    if let Some(session) = session_cookie(&headers)
        && let Err(err) = state
            .flow
            .store()
            .delete_session(&sha256_hex(session))
            .await
    {
        return store_unavailable(Lang::from_headers(&headers), &err);
    }
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [(LOCATION, local("/login")), (SET_COOKIE, clear)],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(
            safe_next(Some("/amocrm/install?subdomain=x")),
            "/amocrm/install?subdomain=x"
        );
        assert_eq!(safe_next(Some("//evil.com/")), "/");
        assert_eq!(safe_next(Some("https://evil.com/")), "/");
        assert_eq!(safe_next(Some("/\\evil.com")), "/");
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, "a=1; amoauth_session=abc; b=2".parse().unwrap());
        assert_eq!(session_cookie(&headers), Some("abc"));
        headers.insert(COOKIE, "amoauth_sessionX=abc".parse().unwrap());
        assert_eq!(session_cookie(&headers), None);
    }
}
