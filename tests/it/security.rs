//! Security headers and admin login hardening.

use sha2::Digest as _;

use crate::support::*;

fn sha256_base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(text.as_bytes()))
}

#[tokio::test]
async fn every_page_carries_the_security_headers() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    for path in [
        "/login",
        "/",
        "/amocrm/callback?state=x",
        "/amocrm/callback/result?r=expired-or-forged",
        "/amocrm/install",
        "/healthz",
        "/api/v1/openapi.json",
        "/no-such-page",
    ] {
        let response = app
            .client
            .get(format!("{}{path}", app.base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
            "{path}: {csp}"
        );
        assert!(
            csp.contains("script-src 'none'"),
            "{path}: no script runs: {csp}"
        );
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert!(
            headers.get("strict-transport-security").is_none(),
            "no HSTS over plain http"
        );
    }
    // The one inline style is allowed by its hash, so pages keep their look under the CSP.
    let response = app
        .client
        .get(format!("{}/login", app.base))
        .send()
        .await
        .unwrap();
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let page = response.text().await.unwrap();
    let style = page
        .split("<style>")
        .nth(1)
        .unwrap()
        .split("</style>")
        .next()
        .unwrap();
    assert!(
        csp.contains(&format!("style-src 'sha256-{}'", sha256_base64(style))),
        "{csp}"
    );
    app.stop().await;
}

#[tokio::test]
async fn repeated_login_failures_back_off() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let login = |token: &'static str| {
        let (client, url) = (app.client.clone(), format!("{}/login", app.base));
        async move {
            let response = client
                .post(url)
                .form(&[("token", token), ("next", "/")])
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.headers().get("retry-after").cloned(),
            )
        }
    };
    for _ in 0..6 {
        assert_eq!(login("wrong-token").await.0, 401);
    }

    let (status, retry_after) = login(ADMIN_TOKEN).await;

    assert_eq!(status, 429, "even the right token waits out the backoff");
    assert!(retry_after.is_some());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        login(ADMIN_TOKEN).await.0,
        303,
        "after the wait, the right token works"
    );
    app.stop().await;
}

#[tokio::test]
async fn logging_in_again_ends_the_previous_session() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let log_in = |cookie: Option<String>| {
        let (client, url) = (app.client.clone(), format!("{}/login", app.base));
        async move {
            let mut request = client
                .post(url)
                .form(&[("token", ADMIN_TOKEN), ("next", "/")]);
            if let Some(cookie) = cookie {
                request = request.header("cookie", cookie);
            }
            let response = request.send().await.unwrap();
            let set = response.headers()["set-cookie"].to_str().unwrap();
            set.split(';').next().unwrap().to_owned()
        }
    };
    let first = log_in(None).await;
    let second = log_in(Some(first.clone())).await;

    assert_ne!(first, second, "a new session id at login");
    assert_eq!(
        app.with_cookie(reqwest::Method::GET, "/", &first)
            .await
            .status(),
        401
    );
    assert_eq!(
        app.with_cookie(reqwest::Method::GET, "/", &second)
            .await
            .status(),
        200
    );
    assert_eq!(app.count("SELECT COUNT(*) FROM amoauth_sessions").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn each_client_ip_is_rate_limited_on_the_public_routes() {
    let options = Options {
        rate_limit: Some("2/s"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    let callback = format!("{}/amocrm/callback?error=access_denied", app.base);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = app.client.get(&callback).send().await.unwrap();
        if response.status() == 429 {
            assert!(
                response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    >= 1
            );
        }
        statuses.push(response.status().as_u16());
    }

    // A burst of twice the rate passes (each to its result page); the rest wait.
    assert_eq!(
        statuses.iter().filter(|s| **s == 303).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_attempts")
            .await,
        4,
        "refused requests do nothing"
    );
    for path in ["/healthz", "/metrics", "/readyz"] {
        let status = app
            .client
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path} is not limited");
    }
    app.stop().await;
}

async fn audit_ip(app: &TestApp) -> String {
    app.db()
        .string("SELECT ip FROM amocrm_oauth_attempts ORDER BY id DESC LIMIT 1")
        .await
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
    let url = |app: &TestApp| format!("{}/amocrm/callback?error=access_denied", app.base);

    let direct = TestApp::spawn(&Backend::Sqlite).await;
    direct
        .client
        .get(url(&direct))
        .header("x-forwarded-for", "203.0.113.5")
        .send()
        .await
        .unwrap();
    assert_eq!(
        audit_ip(&direct).await,
        "127.0.0.1",
        "a client cannot claim another address"
    );
    direct.stop().await;

    let options = Options {
        trusted_proxies: Some("127.0.0.1"),
        rate_limit: Some("1/m"),
        ..Options::default()
    };
    let behind_proxy = TestApp::spawn_with(&Backend::Sqlite, options).await;
    for client in ["203.0.113.5", "203.0.113.6"] {
        let forged_then_real = format!("198.51.100.1, {client}");
        let response = behind_proxy
            .client
            .get(url(&behind_proxy))
            .header("x-forwarded-for", forged_then_real)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 303, "each client has its own budget");
        assert_eq!(audit_ip(&behind_proxy).await, client);
    }
    behind_proxy.stop().await;
}

/// Behind a site's proxy that routes only `/amocrm/`: everything of amoauth's own lives under
/// the prefix, and install and callback keep the seed's paths.
#[tokio::test]
async fn a_base_path_puts_the_dashboard_api_and_probes_under_the_prefix() {
    let options = Options {
        base_path: Some("/amocrm/"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    let status = |path: &'static str| {
        let (client, url) = (app.client.clone(), format!("{}{path}", app.base));
        async move {
            client
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for path in [
        "/amocrm/",
        "/amocrm/healthz",
        "/amocrm/readyz",
        "/amocrm/metrics",
        "/amocrm/api/v1/openapi.json",
    ] {
        assert_eq!(status(path).await, 200, "{path}");
    }
    for path in ["/healthz", "/metrics", "/api/v1/openapi.json", "/login"] {
        assert_eq!(status(path).await, 404, "{path} moved under the prefix");
    }
    assert_eq!(
        status("/amocrm/install").await,
        303,
        "install keeps the seed's path"
    );

    let browser = app
        .client
        .get(format!("{}/amocrm/install", app.base))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(location(&browser), "/amocrm/login?next=%2Famocrm%2Finstall");
    let login = app
        .client
        .post(format!("{}/amocrm/login", app.base))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(
        location(&login),
        "/amocrm/",
        "after login, the dashboard under the prefix"
    );
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = app
        .with_cookie(reqwest::Method::GET, "/amocrm/", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"action="/amocrm/logout""#),
        "links carry the prefix: {page}"
    );
    assert!(page.contains(r#"href="/amocrm/install""#));
    app.connect().await;
    let page = app
        .with_cookie(reqwest::Method::GET, "/amocrm/", &cookie)
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains(r#"action="/amocrm/connections/amocrm:31337001/refresh""#),
        "{page}"
    );
    app.stop().await;
}
