//! What one simulated client does: an install, a complete install + consent + callback flow
//! with its own cookie jar, a token API call, and the sandbox's own endpoints. The same
//! operations run against amoauth and against the ceiling app, so the two compare.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, ensure};
use hyper::StatusCode;

use amoauth::sandbox::Sandbox;

use crate::client::{Conn, CookieJar, Reply};

pub const CLIENT_ID: &str = "bench-client";
pub const CLIENT_SECRET: &str = "bench-client-secret";
pub const ADMIN_TOKEN: &str = "bench-admin-token-0123456789abcdef";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// amoauth: `GET /amocrm/install` as the logged-in admin; ceiling: a fixed redirect.
    Install,
    /// install, the consent page, Allow, and the callback, each flow with a fresh cookie jar.
    Flow,
    /// amoauth: `GET /api/v1/connections/{account}/token`; ceiling: a fixed JSON body.
    Token,
    /// The sandbox alone: its consent page.
    SandboxConsent,
    /// The sandbox alone: the Allow decision, answered with the redirect to the callback.
    SandboxDecide,
    /// The sandbox alone: a code exchange (the code is issued in-process).
    SandboxExchange,
    /// The sandbox alone: `GET /api/v4/account`.
    SandboxAccount,
}

/// Which app the operations hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum App {
    Amoauth,
    Ceiling,
}

/// Everything the workers of one measurement share.
pub struct Env {
    pub app: App,
    pub app_addr: SocketAddr,
    pub sandbox: Sandbox,
    pub sandbox_addr: SocketAddr,
    /// The sandbox's registered Redirect URI (its token endpoint checks it).
    pub redirect_uri: String,
    /// The admin's `amoauth_session=…` cookie, which every flow's jar starts with.
    pub session: Option<String>,
    pub api_key: Option<String>,
    /// Accounts the flows grant and the token calls ask for, taken in turn.
    pub accounts: Vec<i64>,
}

/// One client: its own connections to the app and the sandbox.
/// How far apart in the account list the clients start.
const CLIENT_STRIDE: usize = 97;

pub struct Worker {
    env: Arc<Env>,
    app: Conn,
    sandbox: Conn,
    turn: usize,
    sandbox_access_token: Option<String>,
}

impl Worker {
    pub fn new(env: Arc<Env>, index: usize) -> Self {
        Self {
            app: Conn::new(env.app_addr),
            sandbox: Conn::new(env.sandbox_addr),
            env,
            // Clients walk the accounts from points far apart, so no account is asked for more
            // than amoCRM's 7 calls a second allow (amoauth paces them; the direct one does not).
            turn: index * CLIENT_STRIDE,
            sandbox_access_token: None,
        }
    }

    pub async fn run(&mut self, op: Op) -> anyhow::Result<()> {
        self.turn += 1;
        match op {
            Op::Install => self.install().await,
            Op::Flow => self.flow().await,
            Op::Token => self.token().await,
            Op::SandboxConsent => {
                let path = format!(
                    "/oauth?client_id={CLIENT_ID}&state=s{}&mode=popup",
                    self.turn
                );
                self.sandbox.get(&path, &[]).await?.expect(StatusCode::OK)?;
                Ok(())
            }
            Op::SandboxDecide => {
                let (state, account) = (format!("s{}", self.turn), self.account().to_string());
                let form = decision_form(&state, &account);
                self.sandbox
                    .post_form("/oauth/decide", &[], &form)
                    .await?
                    .location()?;
                Ok(())
            }
            Op::SandboxExchange => self.sandbox_exchange().await.map(drop),
            Op::SandboxAccount => {
                if self.sandbox_access_token.is_none() {
                    self.sandbox_access_token = Some(self.sandbox_exchange().await?);
                }
                let token = self.sandbox_access_token.as_deref().unwrap_or_default();
                let bearer = format!("Bearer {token}");
                let headers = [("authorization", bearer.as_str())];
                let reply = self.sandbox.get("/api/v4/account", &headers).await?;
                reply.expect(StatusCode::OK)?;
                Ok(())
            }
        }
    }

    fn account(&self) -> i64 {
        self.env.accounts[self.turn % self.env.accounts.len()]
    }

    async fn install(&mut self) -> anyhow::Result<()> {
        let path = match self.env.app {
            App::Amoauth => "/amocrm/install",
            App::Ceiling => "/fixed/redirect",
        };
        let session = self.env.session.as_deref().unwrap_or_default();
        let reply = self.app.get(path, &[("cookie", session)]).await?;
        reply.location()?;
        Ok(())
    }

    async fn token(&mut self) -> anyhow::Result<()> {
        let path = match self.env.app {
            App::Amoauth => format!("/api/v1/connections/{}/token", self.account()),
            App::Ceiling => "/fixed/json".to_owned(),
        };
        let bearer = format!("Bearer {}", self.env.api_key.as_deref().unwrap_or_default());
        let reply = self.app.get(&path, &[("authorization", &bearer)]).await?;
        let reply = reply.expect(StatusCode::OK)?;
        const FIELD: &[u8] = b"\"access_token\":\"";
        ensure!(
            reply.body.windows(FIELD.len()).any(|w| w == FIELD),
            "the token API answered without an access token"
        );
        Ok(())
    }

    /// What a browser does, with a jar that holds only the admin's session to begin with.
    async fn flow(&mut self) -> anyhow::Result<()> {
        let (app, sandbox) = (self.env.app_addr, self.env.sandbox_addr);
        let mut jar = CookieJar::default();
        if let Some(session) = &self.env.session {
            jar.set(app, session);
        }

        let install = self
            .app
            .get("/amocrm/install", &[("cookie", &jar.header(app))])
            .await?;
        jar.store(app, &install);
        let consent = install.location().context("install")?;
        ensure!(
            consent.port() == Some(sandbox.port()),
            "install redirected to {consent}"
        );
        let state = query_value(&consent, "state").context("the consent URL has no state")?;

        let page = self
            .sandbox
            .get(
                &path_and_query(&consent),
                &[("cookie", &jar.header(sandbox))],
            )
            .await?;
        jar.store(
            sandbox,
            &page.expect(StatusCode::OK).context("consent page")?,
        );
        let account = self.account().to_string();
        let form = decision_form(&state, &account);
        let cookies = jar.header(sandbox);
        let headers = [("cookie", cookies.as_str())];
        let decision = self
            .sandbox
            .post_form("/oauth/decide", &headers, &form)
            .await?;
        jar.store(sandbox, &decision);
        let callback = decision.location().context("consent decision")?;
        ensure!(
            callback.port() == Some(app.port()),
            "amoCRM redirected to {callback}"
        );

        let cookies = jar.header(app);
        let done = self
            .app
            .get(&path_and_query(&callback), &[("cookie", &cookies)])
            .await?;
        settle_callback(&mut self.app, done, &cookies)
            .await
            .context("callback")
    }

    /// A code exchange straight at the sandbox; returns the access token.
    async fn sandbox_exchange(&mut self) -> anyhow::Result<String> {
        let code = self.env.sandbox.authorize(self.account());
        let request = serde_json::json!({
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.env.redirect_uri,
        });
        let reply = self
            .sandbox
            .post_json("/oauth2/access_token", &request)
            .await?;
        let reply = reply.expect(StatusCode::OK).context("code exchange")?;
        let grant: serde_json::Value = serde_json::from_slice(&reply.body)?;
        grant["access_token"]
            .as_str()
            .map(str::to_owned)
            .context("the grant has no access token")
    }
}

/// The callback answers 303 to its result page (Post/Redirect/Get); the browser follows it
/// and gets 200 when the account was connected.
async fn settle_callback(app: &mut Conn, callback: Reply, cookies: &str) -> anyhow::Result<()> {
    let result = callback
        .expect(StatusCode::SEE_OTHER)?
        .headers
        .get(hyper::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .filter(|location| location.starts_with("/amocrm/callback/result?"))
        .context("the callback redirected elsewhere than its result page")?
        .to_owned();
    app.get(&result, &[("cookie", cookies)])
        .await?
        .expect(StatusCode::OK)?;
    Ok(())
}

fn decision_form<'a>(state: &'a str, account: &'a str) -> [(&'static str, &'a str); 4] {
    [
        ("client_id", CLIENT_ID),
        ("state", state),
        ("account_id", account),
        ("decision", "allow"),
    ]
}

fn path_and_query(url: &url::Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

pub fn query_value(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Connects every account in `accounts` once, the shortest way: install with the admin
/// token, a code the sandbox issues in-process (no consent page), and the callback.
pub async fn connect_directly(
    app: SocketAddr,
    sandbox: &Sandbox,
    accounts: &[i64],
    workers: usize,
) -> anyhow::Result<()> {
    let accounts: Arc<[i64]> = accounts.into();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (accounts, next, sandbox) = (Arc::clone(&accounts), Arc::clone(&next), sandbox.clone());
        tasks.spawn(async move {
            let mut conn = Conn::new(app);
            let bearer = format!("Bearer {ADMIN_TOKEN}");
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&account) = accounts.get(index) else {
                    return anyhow::Ok(());
                };
                let install = conn
                    .get("/amocrm/install", &[("authorization", &bearer)])
                    .await?;
                let consent = install.location().context("install")?;
                let state = query_value(&consent, "state").context("no state")?;
                let code = sandbox.authorize(account);
                let callback = format!(
                    "/amocrm/callback?code={code}&state={state}&referer={}&client_id={CLIENT_ID}",
                    account_host(account)
                );
                let reply = conn.get(&callback, &[]).await?;
                settle_callback(&mut conn, reply, "")
                    .await
                    .with_context(|| format!("connecting {account}"))?;
            }
        });
    }
    for result in tasks.join_all().await {
        result?;
    }
    Ok(())
}

/// The sandbox account the bench makes for an id.
pub fn sandbox_account(id: i64) -> amoauth::sandbox::SandboxAccount {
    amoauth::sandbox::SandboxAccount {
        id,
        name: format!("Bench {id}"),
        subdomain: format!("bench{id}"),
        domain: "amocrm.ru".to_owned(),
    }
}

fn account_host(id: i64) -> String {
    sandbox_account(id).host()
}
