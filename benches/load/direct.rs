//! The direct implementation of issue 15: the same work as amoauth's install, callback and
//! token API, written the shortest way. axum on the same runtime; rusqlite used inline under a
//! mutex on one SQLite file (WAL, `synchronous=NORMAL`, statements prepared once and cached);
//! no sessions, no templates, no refresh worker. It answers on amoauth's paths with amoauth's
//! statuses, so the scenarios of scenario.rs drive it unchanged, and runs as its own process,
//! this bench binary again (like the ceiling app), so its CPU and memory are its own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, Path as UrlPath, RawQuery, State};
use axum::http::header::{ACCEPT, AUTHORIZATION, HOST, LOCATION, USER_AGENT};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rusqlite::{OptionalExtension, params};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;

use crate::scenario::{CLIENT_ID, CLIENT_SECRET};

/// Set to `LISTEN_ADDRESS SANDBOX_ADDRESS DATABASE_FILE`, it makes this bench binary the
/// direct implementation.
pub const ROLE_VARIABLE: &str = "AMOAUTH_BENCH_DIRECT";

/// amoauth's default state lifetime.
const STATE_TTL: Duration = Duration::from_secs(30 * 60);
/// amoauth's cut of stored user agents.
const MAX_USER_AGENT: usize = 512;
/// The domains amoauth accepts account hosts on by default.
const ACCOUNT_DOMAINS: [&str; 3] = ["amocrm.ru", "amocrm.com", "kommo.com"];
const NONCE_LEN: usize = 24;
const B64_URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// What the callback's result token is sealed for, so no other sealed value passes as one.
const RESULT_CONTEXT: &str = "callback result";

const SCHEMA: &str = "
    CREATE TABLE states (
        state_sha256 BLOB PRIMARY KEY,
        expires_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        kind TEXT NOT NULL,
        account_id INTEGER,
        ip TEXT,
        user_agent TEXT,
        state_fingerprint TEXT
    );
    CREATE TABLE connections (
        account_id INTEGER PRIMARY KEY,
        subdomain TEXT NOT NULL,
        domain TEXT NOT NULL,
        access_token BLOB NOT NULL,
        refresh_token BLOB NOT NULL,
        expires_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    CREATE INDEX connections_by_subdomain ON connections (subdomain);
    CREATE TABLE api_keys (
        key_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        secret_sha256 BLOB NOT NULL,
        revoked_at INTEGER
    ) WITHOUT ROWID;
";

/// Creates the direct implementation's database at `path`, empty.
pub fn create_database(path: &Path) -> anyhow::Result<()> {
    let db = open(path)?;
    db.execute_batch(SCHEMA)?;
    Ok(())
}

/// Stores a new API key named `name` as amoauth does (`ak_<key id>_<secret>`, the secret
/// kept only as its SHA-256) and returns the full key, for the token API's clients.
pub fn create_api_key(path: &Path, name: &str) -> anyhow::Result<String> {
    let key_id = hex::encode(random::<8>());
    let secret = hex::encode(random::<32>());
    open(path)?.execute(
        "INSERT INTO api_keys (key_id, name, secret_sha256) VALUES (?1, ?2, ?3)",
        params![key_id, name, Sha256::digest(secret.as_bytes()).as_slice()],
    )?;
    Ok(format!("ak_{key_id}_{secret}"))
}

fn open(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    let db = rusqlite::Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.busy_timeout(Duration::from_secs(5))?;
    Ok(db)
}

/// Serves until killed, as `role` (the variable's value) says.
pub fn serve(role: &str) -> anyhow::Result<()> {
    let mut parts = role.splitn(3, ' ');
    let (Some(listen), Some(sandbox), Some(database)) = (parts.next(), parts.next(), parts.next())
    else {
        anyhow::bail!("expected `LISTEN_ADDRESS SANDBOX_ADDRESS DATABASE_FILE`");
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let key = base64::engine::general_purpose::STANDARD.decode(crate::ENCRYPTION_KEY)?;
    let direct = Arc::new(Direct {
        db: Mutex::new(open(Path::new(database))?),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?,
        cipher: XChaCha20Poly1305::new_from_slice(&key).context("a 32-byte key")?,
        sandbox: format!("http://{sandbox}"),
        consent: format!("http://{sandbox}/oauth?client_id={CLIENT_ID}&mode=popup&state="),
        redirect_uri: format!("http://{listen}/amocrm/callback"),
    });
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let router = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/amocrm/install", get(install))
            .route("/amocrm/callback", get(callback))
            .route("/amocrm/callback/result", get(callback_result))
            .route("/api/v1/connections/{account}/token", get(token))
            .with_state(direct);
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await?;
        Ok(())
    })
}

struct Direct {
    db: Mutex<rusqlite::Connection>,
    http: reqwest::Client,
    cipher: XChaCha20Poly1305,
    /// The sandbox's origin, where every account host's requests go (as amoauth's
    /// `AMOAUTH_AMOCRM_URL` sends them), the host named in `Host`.
    sandbox: String,
    /// The consent URL up to the state.
    consent: String,
    redirect_uri: String,
}

impl Direct {
    /// The connection, used inline: every statement runs on the request's own thread.
    fn db(&self) -> MutexGuard<'_, rusqlite::Connection> {
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// nonce || ciphertext+tag, with `context` authenticated alongside.
    fn seal(&self, plaintext: &[u8], context: &str) -> Vec<u8> {
        let nonce = random::<NONCE_LEN>();
        let payload = Payload {
            msg: plaintext,
            aad: context.as_bytes(),
        };
        let mut blob = nonce.to_vec();
        blob.extend(
            self.cipher
                .encrypt(&XNonce::from(nonce), payload)
                .expect("encryption into a Vec cannot fail"),
        );
        blob
    }

    /// The API key checked, then the account's connection (by id or subdomain), in two
    /// statements under one lock.
    fn lookup(&self, key_id: &str, secret: &str, account: &str) -> rusqlite::Result<Lookup> {
        let db = self.db();
        let stored: Option<Vec<u8>> = db
            .prepare_cached(
                "SELECT secret_sha256 FROM api_keys WHERE key_id = ?1 AND revoked_at IS NULL",
            )?
            .query_row([key_id], |row| row.get(0))
            .optional()?;
        let presented = Sha256::digest(secret.as_bytes());
        if !stored.is_some_and(|stored| bool::from(presented.as_slice().ct_eq(&stored))) {
            return Ok(Lookup::BadKey);
        }
        let by = match account.parse::<i64>() {
            Ok(_) => "account_id",
            Err(_) => "subdomain",
        };
        let connection = db
            .prepare_cached(&format!(
                "SELECT account_id, subdomain, domain, access_token, expires_at \
                 FROM connections WHERE {by} = ?1"
            ))?
            .query_row([account], |row| {
                Ok(Connection {
                    account_id: row.get(0)?,
                    subdomain: row.get(1)?,
                    domain: row.get(2)?,
                    access_token: row.get(3)?,
                    expires_at: row.get(4)?,
                })
            })
            .optional()?;
        Ok(connection.map_or(Lookup::NoConnection, Lookup::Found))
    }

    fn open(&self, blob: &[u8], context: &str) -> Option<Vec<u8>> {
        let nonce = <[u8; NONCE_LEN]>::try_from(blob.get(..NONCE_LEN)?).ok()?;
        let payload = Payload {
            msg: &blob[NONCE_LEN..],
            aad: context.as_bytes(),
        };
        self.cipher.decrypt(&XNonce::from(nonce), payload).ok()
    }
}

/// Who asked, for the audit row.
struct Requester {
    ip: String,
    user_agent: Option<String>,
}

impl Requester {
    fn new(peer: SocketAddr, headers: &HeaderMap) -> Self {
        let user_agent = headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|ua| ua.chars().take(MAX_USER_AGENT).collect());
        Self {
            ip: peer.ip().to_string(),
            user_agent,
        }
    }
}

/// `GET /amocrm/install`: a 256-bit state stored as its SHA-256 with an audit row, in one
/// transaction; 303 to amoCRM's consent page.
async fn install(
    State(direct): State<Arc<Direct>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let state = hex::encode(random::<32>());
    let state_sha256 = Sha256::digest(state.as_bytes());
    let requester = Requester::new(peer, &headers);
    let now = unix_now();
    let saved = (|| {
        let mut db = direct.db();
        let tx = db.transaction()?;
        tx.prepare_cached("INSERT INTO states (state_sha256, expires_at) VALUES (?1, ?2)")?
            .execute(params![
                state_sha256.as_slice(),
                now + STATE_TTL.as_secs() as i64
            ])?;
        audit(&tx, now, "install", None, &requester, &state_sha256)?;
        tx.commit()
    })();
    match saved {
        Ok(()) => (
            StatusCode::SEE_OTHER,
            [(LOCATION, format!("{}{state}", direct.consent))],
        )
            .into_response(),
        Err(err) => database_failed(&err),
    }
}

fn audit(
    tx: &rusqlite::Transaction<'_>,
    at: i64,
    kind: &str,
    account_id: Option<i64>,
    requester: &Requester,
    state_sha256: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit (at, kind, account_id, ip, user_agent, state_fingerprint) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        at,
        kind,
        account_id,
        requester.ip,
        requester.user_agent,
        hex::encode(&state_sha256[..8]),
    ])?;
    Ok(())
}

#[derive(Deserialize)]
struct TokenGrant {
    access_token: String,
    refresh_token: String,
    expires_in: i64,
}

#[derive(Deserialize)]
struct Account {
    id: i64,
    subdomain: String,
}

/// `GET /amocrm/callback`: the state consumed by one `DELETE … RETURNING`, the code
/// exchanged and the account looked up at the account's host, the pair sealed and upserted
/// with an audit row in one transaction; 303 to the result page (Post/Redirect/Get, as
/// amoauth answers).
async fn callback(
    State(direct): State<Arc<Direct>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    let param = |name: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    };
    if param("error").is_some() {
        return refused(StatusCode::FORBIDDEN, "access was denied in amoCRM");
    }
    if param("client_id").is_some_and(|id| id != CLIENT_ID) {
        return refused(
            StatusCode::BAD_REQUEST,
            "client_id is not this integration's",
        );
    }
    let (Some(code), Some(state), Some(referer)) =
        (param("code"), param("state"), param("referer"))
    else {
        return refused(
            StatusCode::BAD_REQUEST,
            "code, state and referer are required",
        );
    };
    let Some((host, _)) = account_host(&referer) else {
        return refused(
            StatusCode::BAD_REQUEST,
            "the referer is not an amoCRM account host",
        );
    };
    if state.len() != 64 || !state.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refused(StatusCode::BAD_REQUEST, "unknown state");
    }
    let state_sha256 = Sha256::digest(state.as_bytes());
    let consumed = direct
        .db()
        .prepare_cached(
            "DELETE FROM states WHERE state_sha256 = ?1 AND expires_at > ?2 RETURNING 1",
        )
        .and_then(|mut delete| {
            delete
                .query_row(params![state_sha256.as_slice(), unix_now()], |_| Ok(()))
                .optional()
        });
    match consumed {
        Ok(Some(())) => {}
        Ok(None) => return refused(StatusCode::BAD_REQUEST, "unknown, used or expired state"),
        Err(err) => return database_failed(&err),
    }

    let form = [
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", direct.redirect_uri.as_str()),
    ];
    let exchange = direct
        .http
        .post(format!("{}/oauth2/access_token", direct.sandbox))
        .header(HOST, host)
        .header(ACCEPT, "application/json")
        .form(&form);
    let grant: TokenGrant = match fetch_json(exchange).await {
        Ok(grant) => grant,
        Err(err) => return amocrm_failed("exchanging the code", &err),
    };
    let lookup = direct
        .http
        .get(format!("{}/api/v4/account", direct.sandbox))
        .header(HOST, host)
        .header(ACCEPT, "application/hal+json, application/json")
        .bearer_auth(&grant.access_token);
    let account: Account = match fetch_json(lookup).await {
        Ok(account) => account,
        Err(err) => return amocrm_failed("looking up the account", &err),
    };

    let access_token = direct.seal(
        grant.access_token.as_bytes(),
        &token_context("access_token", account.id),
    );
    let refresh_token = direct.seal(
        grant.refresh_token.as_bytes(),
        &token_context("refresh_token", account.id),
    );
    let requester = Requester::new(peer, &headers);
    let now = unix_now();
    let saved = (|| {
        let mut db = direct.db();
        let tx = db.transaction()?;
        tx.prepare_cached(
            "INSERT INTO connections \
             (account_id, subdomain, domain, access_token, refresh_token, expires_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (account_id) DO UPDATE SET subdomain = excluded.subdomain, \
             domain = excluded.domain, access_token = excluded.access_token, \
             refresh_token = excluded.refresh_token, expires_at = excluded.expires_at, \
             updated_at = excluded.updated_at",
        )?
        .execute(params![
            account.id,
            account.subdomain,
            host,
            access_token,
            refresh_token,
            now + grant.expires_in.clamp(1, 10 * 366 * 86_400),
            now,
        ])?;
        audit(
            &tx,
            now,
            "callback",
            Some(account.id),
            &requester,
            &state_sha256,
        )?;
        tx.commit()
    })();
    if let Err(err) = saved {
        return database_failed(&err);
    }
    let result = B64_URL.encode(direct.seal(&account.id.to_be_bytes(), RESULT_CONTEXT));
    (
        StatusCode::SEE_OTHER,
        [(LOCATION, format!("/amocrm/callback/result?r={result}"))],
    )
        .into_response()
}

/// `GET /amocrm/callback/result?r=…`: the page of a finished callback, from the sealed
/// account id alone.
async fn callback_result(State(direct): State<Arc<Direct>>, RawQuery(query): RawQuery) -> Response {
    let query = query.unwrap_or_default();
    let account_id = url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "r")
        .and_then(|(_, token)| B64_URL.decode(token.as_bytes()).ok())
        .and_then(|blob| direct.open(&blob, RESULT_CONTEXT))
        .and_then(|id| Some(i64::from_be_bytes(id.try_into().ok()?)));
    match account_id {
        Some(id) => Html(format!(
            "<!doctype html><title>amoCRM connected</title><p>amoCRM account {id} is connected.</p>"
        ))
        .into_response(),
        None => refused(StatusCode::GONE, "this result has expired or was altered"),
    }
}

/// `GET /api/v1/connections/{account}/token` with `Authorization: Bearer ak_…`: the API key
/// row by id with a constant-time SHA-256 compare, the connection row, the access token
/// opened, JSON.
async fn token(
    State(direct): State<Arc<Direct>>,
    UrlPath(account): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .and_then(|key| key.strip_prefix("ak_")?.split_once('_'))
        .filter(|(key_id, _)| key_id.len() == 16);
    let Some((key_id, secret)) = presented else {
        return refused(StatusCode::UNAUTHORIZED, "an API key is required");
    };
    let connection = match direct.lookup(key_id, secret, &account) {
        Ok(Lookup::Found(connection)) => connection,
        Ok(Lookup::NoConnection) => return refused(StatusCode::NOT_FOUND, "no such connection"),
        Ok(Lookup::BadKey) => return refused(StatusCode::UNAUTHORIZED, "the API key is not valid"),
        Err(err) => return database_failed(&err),
    };
    if connection.expires_at <= unix_now() {
        // Nothing here refreshes: amoauth would refresh first.
        return refused(StatusCode::CONFLICT, "the access token has expired");
    }
    let context = token_context("access_token", connection.account_id);
    let Some(access_token) = direct
        .open(&connection.access_token, &context)
        .and_then(|plain| String::from_utf8(plain).ok())
    else {
        return refused(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stored token does not open",
        );
    };
    let expires_at = chrono::DateTime::from_timestamp(connection.expires_at, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    axum::Json(serde_json::json!({
        "account_id": connection.account_id,
        "subdomain": connection.subdomain,
        "domain": connection.domain,
        "access_token": access_token,
        "expires_at": expires_at,
    }))
    .into_response()
}

/// What the token API found for a key and an account.
enum Lookup {
    BadKey,
    NoConnection,
    Found(Connection),
}

struct Connection {
    account_id: i64,
    subdomain: String,
    domain: String,
    access_token: Vec<u8>,
    expires_at: i64,
}

/// A 2xx JSON answer from amoCRM, parsed.
async fn fetch_json<T: serde::de::DeserializeOwned>(
    request: reqwest::RequestBuilder,
) -> anyhow::Result<T> {
    let response = request.send().await?.error_for_status()?;
    Ok(serde_json::from_slice(&response.bytes().await?)?)
}

/// `{subdomain}.{domain}` on an allowed domain, as `(host, subdomain)`.
fn account_host(candidate: &str) -> Option<(&str, &str)> {
    let (subdomain, domain) = candidate.split_once('.')?;
    let label = !subdomain.is_empty()
        && subdomain.len() <= 63
        && subdomain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !subdomain.starts_with('-')
        && !subdomain.ends_with('-')
        && !["www", "api-a", "api-b"].contains(&subdomain);
    (label && ACCOUNT_DOMAINS.contains(&domain)).then_some((candidate, subdomain))
}

/// What a token is sealed for, as amoauth binds it: its column and its account.
fn token_context(column: &str, account_id: i64) -> String {
    format!("{column}\0account_id={account_id}")
}

fn refused(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

fn database_failed(err: &rusqlite::Error) -> Response {
    eprintln!("database: {err}");
    refused(
        StatusCode::SERVICE_UNAVAILABLE,
        "the database is unavailable",
    )
}

/// The error names the step and the status, never the request (which holds the secret and
/// the code).
fn amocrm_failed(step: &str, err: &anyhow::Error) -> Response {
    let status = err
        .downcast_ref::<reqwest::Error>()
        .and_then(reqwest::Error::status)
        .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
    refused(
        StatusCode::BAD_GATEWAY,
        &format!("{step} at amoCRM failed: {status}"),
    )
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    bytes
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
