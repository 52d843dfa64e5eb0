//! Admin authentication: the Bearer admin token, or a browser session made by logging in with it.

use axum::Extension;
use axum::Form;
use axum::extract::{FromRequestParts, OriginalUri, Query, State};
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
use crate::store::{Store, StoreError, now};

const SESSION_COOKIE: &str = "amoauth_session";
const SESSION_LIFETIME: chrono::Duration = chrono::Duration::hours(12);
/// A login link printed at start is for the operator reading it now.
const LOGIN_LINK_LIFETIME: chrono::Duration = chrono::Duration::minutes(10);

/// Makes a one-time login link under `site` (the public origin and base path): the link's
/// token is random and only its hash is stored, in the database, so whichever replica the
/// operator's browser reaches can redeem it, once.
#[doc(hidden)]
pub async fn new_login_link(store: &Store, site: &str) -> Result<String, StoreError> {
    let token = random_token();
    store
        .insert_login_link(&sha256_hex(&token), now() + LOGIN_LINK_LIFETIME)
        .await?;
    Ok(format!("{site}/login?link={token}"))
}

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
    Browser {
        next: String,
    },
    /// Too many failed admin authentications from this IP; retry after this many seconds.
    Throttled {
        seconds: u64,
    },
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
            Self::Throttled { seconds } => (
                StatusCode::TOO_MANY_REQUESTS,
                [(RETRY_AFTER, seconds.to_string())],
                format!("429 Too Many Requests: too many failed admin logins; try again in {seconds} s\n"),
            )
                .into_response(),
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
            // A Bearer guess counts like a wrong login form: one backoff for every form.
            let ip = client_ip(parts);
            if let Some(seconds) = throttled(state, ip) {
                tracing::warn!(%ip, seconds, "admin token refused: too many failures");
                return Err(Unauthorized::Throttled { seconds });
            }
            return if constant_time_eq(token, state.admin_token.expose()) {
                state.login_throttle.succeeded(ip);
                Ok(Admin { session: None })
            } else {
                state.login_throttle.failed(ip);
                tracing::warn!(%ip, "wrong admin token in Authorization");
                Err(Unauthorized::Api)
            };
        }
        if let Some(session) = session_cookie(&parts.headers) {
            let valid = state
                .store
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
            // The whole path, base path included: a nested router sees only its own part.
            let uri = parts
                .extensions
                .get::<OriginalUri>()
                .map_or(&parts.uri, |original| &original.0);
            let next = uri
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

/// The client's address as `client::identify` worked it out (the peer when it did not run).
fn client_ip(parts: &Parts) -> IpAddr {
    parts.extensions.get::<ClientIp>().map_or(
        IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        |ClientIp(ip)| *ip,
    )
}

/// Seconds `ip` must wait before its next admin authentication, if it must.
fn throttled(state: &AppState, ip: IpAddr) -> Option<u64> {
    state.login_throttle.wait(ip).map(|wait| wait.as_secs() + 1)
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

/// Only this site's paths are followed after login, never another site: `next` is resolved
/// as the browser would resolve it against this site and must stay on its origin. Control
/// characters, whitespace and backslashes are refused outright, since browsers strip or
/// rewrite them (`/\t/evil.example` becomes `//evil.example`).
fn safe_next(next: Option<&str>, base_path: &str) -> String {
    let home = || format!("{base_path}/");
    let Some(next) = next else {
        return home();
    };
    if next.is_empty()
        || next
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '\\')
    {
        return home();
    }
    // A made-up origin stands for this site: only the path and query are kept.
    let site = url::Url::parse(&format!("http://amoauth.invalid{base_path}/"))
        .expect("the base path is a valid URL path");
    match site.join(next) {
        Ok(resolved) if resolved.origin() == site.origin() => {
            let mut local = resolved.path().to_owned();
            if let Some(query) = resolved.query() {
                local.push('?');
                local.push_str(query);
            }
            local
        }
        _ => home(),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    /// The one-time login link printed at start.
    link: Option<String>,
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
    let next = safe_next(query.next.as_deref(), &state.base_path);
    match query.link {
        Some(link) => log_in(&state, peer, &headers, Credential::Link(&link), &next).await,
        None => Html(pages::login(lang, &next, false).into_string()).into_response(),
    }
}

pub async fn login_submit(
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref(), &state.base_path);
    log_in(
        &state,
        peer,
        &headers,
        Credential::Token(&form.token),
        &next,
    )
    .await
}

/// What a browser logs in with.
enum Credential<'a> {
    /// The admin token, typed into the login form.
    Token(&'a str),
    /// A one-time login link's token.
    Link(&'a str),
}

impl Credential<'_> {
    async fn is_valid(&self, state: &AppState) -> Result<bool, StoreError> {
        match self {
            Self::Token(token) => Ok(constant_time_eq(token, state.admin_token.expose())),
            Self::Link(link) => {
                state
                    .store
                    .redeem_login_link(&sha256_hex(link), now())
                    .await
            }
        }
    }
}

async fn log_in(
    state: &AppState,
    peer: IpAddr,
    headers: &HeaderMap,
    credential: Credential<'_>,
    next: &str,
) -> Response {
    let lang = Lang::from_headers(headers);
    if let Some(seconds) = throttled(state, peer) {
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
    let valid = match credential.is_valid(state).await {
        Ok(valid) => valid,
        Err(err) => return store_unavailable(lang, &err),
    };
    if !valid {
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
        && let Err(err) = state.store.delete_session(&sha256_hex(old)).await
    {
        return store_unavailable(lang, &err);
    }
    let session = random_token();
    let created = now();
    let user_agent = headers.get(USER_AGENT).and_then(|v| v.to_str().ok());
    let ip = peer.to_string();
    if let Err(err) = state
        .store
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
        && let Err(err) = state.store.delete_session(&sha256_hex(session)).await
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
            safe_next(Some("/amocrm/install?subdomain=x"), ""),
            "/amocrm/install?subdomain=x"
        );
        assert_eq!(safe_next(Some("//evil.com/"), ""), "/");
        assert_eq!(safe_next(Some("https://evil.com/"), ""), "/");
        assert_eq!(safe_next(Some("/\\evil.com"), ""), "/");
        assert_eq!(safe_next(None, ""), "/");
        assert_eq!(safe_next(None, "/amocrm"), "/amocrm/");
    }

    #[test]
    fn next_with_characters_browsers_strip_is_refused() {
        for next in [
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r/evil.example",
            "/ /evil.example",
            "/\u{0}/evil.example",
            "/\u{a0}/evil.example",
            "/x\\y",
            "\t//evil.example",
            "http://evil.example",
            "https:/evil.example",
            "///evil.example",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_next(Some(next), "/amocrm"), "/amocrm/", "{next:?}");
        }
    }

    #[test]
    fn next_resolves_against_the_base_path() {
        assert_eq!(safe_next(Some("/amocrm/"), "/amocrm"), "/amocrm/");
        assert_eq!(
            safe_next(Some("install?a=b"), "/amocrm"),
            "/amocrm/install?a=b"
        );
        assert_eq!(safe_next(Some("/a/../b"), ""), "/b");
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
