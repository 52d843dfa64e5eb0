//! The seed's flow end to end: install, consent at the sandbox, callback, over real sockets.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

async fn full_flow_without_cookies_stores_sealed_tokens_and_deletes_the_state(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let consent = app.install().await;
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        1
    );
    let callback = app.consent(&consent, "allow").await;
    assert!(callback.starts_with(&format!("{}/amocrm/callback?", app.base)));

    let (status, body) = app.open_callback(&callback).await;

    assert_eq!(status, 200, "{body}");
    assert!(body.contains("amoCRM успешно подключена!"), "{body}");
    assert!(body.contains("Демо-аккаунт"));
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        0
    );
    let db = app.db();
    assert_eq!(
        db.count("SELECT account_id FROM amocrm_tokens").await,
        ACCOUNT_ID
    );
    assert_eq!(
        db.string("SELECT domain FROM amocrm_tokens").await,
        ACCOUNT_HOST
    );
    assert_eq!(
        db.string("SELECT status FROM amocrm_tokens").await,
        "active"
    );
    let expires_at = db.timestamp("SELECT expires_at FROM amocrm_tokens").await;
    let hours = (expires_at - chrono::Utc::now().naive_utc()).num_minutes() as f64 / 60.0;
    assert!(
        (23.9..24.1).contains(&hours),
        "expires_at should come from expires_in (24 h), got {hours} h"
    );
    // No code, access token or refresh token the sandbox issued is stored in plain text anywhere.
    let stored = [
        db.all_text("amocrm_tokens").await,
        db.all_text("amocrm_oauth_attempts").await,
        db.all_text("amocrm_oauth_states").await,
    ]
    .concat();
    assert!(
        stored.contains("demo.amocrm.ru"),
        "the leak check reads the rows: {stored}"
    );
    let secrets = app.sandbox.issued_secrets();
    assert_eq!(
        secrets.len(),
        3,
        "one code, one access token, one refresh token"
    );
    for secret in &secrets {
        assert!(
            !stored.contains(secret.as_str()),
            "a plaintext secret is stored"
        );
    }
    let raw = db.string("SELECT raw FROM amocrm_tokens").await;
    let raw: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(raw["token"]["expires_in"], 86400);
    assert_eq!(raw["account"]["id"], ACCOUNT_ID);
    assert!(
        raw["token"].get("access_token").is_none() && raw["token"].get("refresh_token").is_none()
    );
    let outcomes = db
        .strings("SELECT CONCAT(kind, ':', outcome) FROM amocrm_oauth_attempts ORDER BY id")
        .await;
    assert_eq!(
        outcomes,
        [
            Some("install:started".into()),
            Some("callback:success".into())
        ]
    );
    // The exchange went to the account's own host.
    assert_eq!(app.sandbox.stats().token_hosts, [ACCOUNT_HOST]);
    app.stop().await;
}

async fn replayed_callback_is_refused_and_the_code_is_exchanged_once(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    assert_eq!(app.open_callback(&callback).await.0, 200);

    let (status, body) = app.open_callback(&callback).await;

    assert_eq!(status, 409);
    assert!(body.contains("Ссылка уже использована"), "{body}");
    assert_eq!(app.sandbox.stats().code_exchanges, 1);
    assert_eq!(app.callback_reasons().await, ["-", "used_state"]);
    app.stop().await;
}

async fn concurrent_callbacks_with_one_state_connect_exactly_once(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;

    let statuses = concurrent_statuses(&app, &callback, 64).await;

    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 409).count(),
        63,
        "{statuses:?}"
    );
    assert_eq!(app.sandbox.stats().code_exchanges, 1);
    assert_eq!(app.count("SELECT COUNT(*) FROM amocrm_tokens").await, 1);
    app.stop().await;
}

/// Sends `n` GETs of `url` at once, each on its own task so they really race at the server;
/// the statuses of the pages the browsers end on.
pub async fn concurrent_statuses(app: &TestApp, url: &str, n: usize) -> Vec<u16> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (client, url) = (app.client.clone(), url.to_owned());
        tasks.spawn(async move { open_callback(&client, &url).await.0 });
    }
    tasks.join_all().await
}

async fn expired_state_is_refused_as_expired_without_an_exchange(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            state_ttl: Some("300ms"),
            ..Options::default()
        },
    )
    .await;
    let callback = app.allowed_callback_url().await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    let (status, body) = app.open_callback(&callback).await;

    assert_eq!(status, 410);
    assert!(body.contains("Ссылка устарела"), "{body}");
    assert_eq!(app.callback_reasons().await, ["expired_state"]);
    assert_eq!(app.sandbox.stats().code_exchanges, 0);
    app.stop().await;
}

async fn unknown_and_malformed_states_are_refused_without_an_exchange(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    let real_state = query_param(&callback, "state").unwrap();
    let forged = "ab".repeat(32);
    for state in [
        forged.as_str(),
        "' OR '1'='1",
        "74b6eb22a581338909023f94847c9242",
    ] {
        let url = callback.replace(&real_state, &urlencode(state));

        let (status, body) = app.open_callback(&url).await;

        assert_eq!(status, 400, "{state}");
        assert!(body.contains("Ссылка не распознана"), "{body}");
    }
    assert_eq!(app.callback_reasons().await, ["unknown_state"; 3]);
    assert_eq!(app.sandbox.stats().code_exchanges, 0);
    // The real state was not touched by the forgeries.
    assert_eq!(app.open_callback(&callback).await.0, 200);
    app.stop().await;
}

fn urlencode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

async fn referers_outside_the_allow_list_make_no_outbound_request(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let consent = app.install().await;
    let state = query_param(&consent, "state").unwrap();
    let before = app.sandbox.stats().requests;
    let hostile = [
        "evil.example.com",
        "demo.amocrm.ru.evil.com",
        "x@evil.com",
        "x@demo.amocrm.ru",
        "",
        "https://demo.amocrm.ru",
        "//demo.amocrm.ru",
        "demo.amocrm.ru:443",
        "demo.amocrm.ru:8443",
        "demo.amocrm.ru/oauth2",
        "demo.amocrm.ru#",
        "DEMO.amocrm.ru",
        "demo.AMOCRM.RU",
        "amocrm.ru",
        "a.demo.amocrm.ru",
        "demo.amocrm.ru.",
        "dеmo.amocrm.ru",
        "xn--dmo-jdd.amocrm.ru.evil.com",
        "demo.amocrm.ru\u{0}",
        "127.0.0.1",
        "localhost",
    ];
    for referer in hostile {
        let url = format!(
            "{}/amocrm/callback?code=stolen&state={state}&referer={}&client_id={CLIENT_ID}",
            app.base,
            urlencode(referer)
        );

        let (status, body) = app.get(&url).await;

        assert!(
            (400..500).contains(&status),
            "{referer:?} answered {status}"
        );
        assert!(
            body.contains("Недопустимый адрес аккаунта") || body.contains("Неверный запрос"),
            "{referer:?}: {body}"
        );
    }
    assert_eq!(
        app.sandbox.stats().requests,
        before,
        "no request may reach amoCRM"
    );
    let reasons = app.callback_reasons().await;
    assert_eq!(reasons.len(), hostile.len());
    assert!(
        reasons
            .iter()
            .all(|r| r == "bad_referer" || r == "invalid_request"),
        "{reasons:?}"
    );
    // The state survived every forged callback.
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        1
    );
    app.stop().await;
}

async fn access_denied_shows_a_clear_page_and_is_audited(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let consent = app.install().await;
    let callback = app.consent(&consent, "deny").await;
    assert_eq!(
        query_param(&callback, "error").as_deref(),
        Some("access_denied")
    );

    let result = result_url(&app.client, &callback).await;
    let (status, body) = app.get(&result).await;

    assert_eq!(status, 403);
    assert!(body.contains("Доступ не предоставлен"), "{body}");
    assert!(body.contains("Попробовать снова"));
    let english = app
        .client
        .get(&result)
        .header("accept-language", "en-US,en;q=0.9")
        .send()
        .await
        .unwrap();
    assert!(
        english
            .text()
            .await
            .unwrap()
            .contains("Access was denied in amoCRM")
    );
    assert_eq!(
        app.callback_reasons().await,
        ["access_denied"],
        "the result page in another language is no second callback"
    );
    assert_eq!(app.sandbox.stats().code_exchanges, 0);
    app.stop().await;
}

async fn amocrm_failures_are_reported_precisely_and_store_nothing(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            amocrm_timeout: Some("500ms"),
            ..Options::default()
        },
    )
    .await;
    let cases = [
        (
            Fault::Problem {
                status: 400,
                hint: "Authorization code has been revoked".into(),
            },
            502,
            "amocrm_rejected",
            "Authorization code has been revoked",
        ),
        (Fault::ServerError, 502, "amocrm_error", "HTTP 500"),
        (Fault::Garbage, 502, "amocrm_bad_response", "non-JSON"),
        (
            Fault::Delay(Duration::from_secs(2)),
            504,
            "amocrm_timeout",
            "amoCRM не ответила вовремя",
        ),
    ];
    for (fault, expected_status, reason, shown) in cases {
        let callback = app.allowed_callback_url().await;
        app.sandbox.set_token_fault(Some(fault.clone()));

        let (status, body) = app.open_callback(&callback).await;

        assert_eq!(status, expected_status, "{fault:?}: {body}");
        assert!(
            body.contains(shown),
            "{fault:?}: page should say {shown:?}: {body}"
        );
        assert!(
            body.contains(ACCOUNT_HOST),
            "the page names the account host"
        );
        assert_eq!(app.callback_reasons().await.last().unwrap(), reason);
        let detail = app
            .db()
            .string("SELECT detail FROM amocrm_oauth_attempts ORDER BY id DESC LIMIT 1")
            .await;
        assert!(
            detail.contains("exchanging the code at demo.amocrm.ru"),
            "{detail}"
        );
    }
    app.sandbox.set_token_fault(None);
    app.sandbox.set_account_fault(Some(Fault::ServerError));
    let callback = app.allowed_callback_url().await;
    let (status, body) = app.open_callback(&callback).await;
    assert_eq!(status, 502);
    assert!(body.contains("Запрос данных аккаунта"), "{body}");
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_tokens").await,
        0,
        "nothing may be stored"
    );
    app.stop().await;
}

async fn install_requires_the_admin_and_redirects_with_a_256_bit_state(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let url = format!("{}/amocrm/install?subdomain=demo", app.base);

    let anonymous = app.client.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let wrong = app
        .client
        .get(&url)
        .bearer_auth("not-the-admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let browser = app
        .client
        .get(&url)
        .header("accept", "text/html,*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(browser.status(), 303);
    assert_eq!(
        location(&browser),
        "/login?next=%2Famocrm%2Finstall%3Fsubdomain%3Ddemo"
    );
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        0
    );

    let admin = app
        .client
        .get(&url)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();

    assert_eq!(admin.status(), 303);
    let consent = location(&admin);
    assert!(
        consent.starts_with(&format!("{}/oauth?", app.sandbox_origin)),
        "{consent}"
    );
    assert_eq!(
        query_param(&consent, "client_id").as_deref(),
        Some(CLIENT_ID)
    );
    let state = query_param(&consent, "state").unwrap();
    // 16 hex digits of creation time, then 256 random bits.
    assert_eq!(state.len(), 80);
    assert!(state.bytes().all(|b| b.is_ascii_hexdigit()));
    let micros = i64::from_str_radix(&state[..16], 16).unwrap();
    let age = chrono::Utc::now().timestamp_micros() - micros;
    assert!(
        (0..60_000_000).contains(&age),
        "the prefix is the creation time: {age} µs ago"
    );
    let db = app.db();
    let hash = db
        .string("SELECT state_hash FROM amocrm_oauth_states")
        .await;
    let subdomain = db.string("SELECT subdomain FROM amocrm_oauth_states").await;
    let ttl = db
        .timestamp("SELECT expires_at FROM amocrm_oauth_states")
        .await
        - db.timestamp("SELECT created_at FROM amocrm_oauth_states")
            .await;
    let minutes = ttl.num_milliseconds() as f64 / 60_000.0;
    assert_ne!(hash, state, "only the hash of the state is stored");
    assert_eq!(
        hash,
        format!("{}{}", &state[..16], amoauth::internal::sha256_hex(&state)),
        "the key is the time prefix and the SHA-256 of the state"
    );
    assert_eq!(subdomain, "demo");
    assert!(
        (14.9..15.1).contains(&minutes),
        "default TTL is 15 minutes, got {minutes}"
    );
    let bad = app
        .client
        .get(format!("{}/amocrm/install?subdomain=evil.com", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    app.stop().await;
}

async fn browser_login_gives_a_session_cookie_that_opens_admin_pages(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let login = format!("{}/login", app.base);
    let wrong = app
        .client
        .post(&login)
        .form(&[("token", "wrong"), ("next", "/")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let response = app
        .client
        .post(&login)
        .form(&[("token", ADMIN_TOKEN), ("next", "/amocrm/install")])
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 303);
    assert_eq!(location(&response), "/amocrm/install");
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let value = pair.split_once('=').unwrap().1.to_owned();
    let stored = app
        .db()
        .string("SELECT id_hash FROM amoauth_sessions")
        .await;
    assert_ne!(stored, value, "only a hash of the session id is stored");
    let install = app
        .with_cookie(reqwest::Method::GET, "/amocrm/install", &pair)
        .await;
    assert_eq!(install.status(), 303);
    let home = app.with_cookie(reqwest::Method::GET, "/", &pair).await;
    assert_eq!(home.status(), 200);
    let page = home.text().await.unwrap();
    assert!(page.contains("Подключить amoCRM"));
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the logout form carries a CSRF token");

    let forged = app
        .with_cookie(reqwest::Method::POST, "/logout", &pair)
        .await;
    assert_eq!(forged.status(), 403, "logout needs the CSRF token");
    let logout = app
        .client
        .post(format!("{}/logout", app.base))
        .header("cookie", &pair)
        .form(&[("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    let after = app.with_cookie(reqwest::Method::GET, "/", &pair).await;
    assert_eq!(after.status(), 401, "the session ends at logout");
    app.stop().await;
}

async fn widget_installs_are_refused_unless_turned_on(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let code = app.sandbox.authorize(ACCOUNT_ID);
    let url = format!(
        "{}/amocrm/callback?code={code}&referer={ACCOUNT_HOST}&from_widget=1",
        app.base
    );

    let (status, body) = app.get(&url).await;

    assert_eq!(status, 403);
    assert!(body.contains("AMOAUTH_WIDGET_INSTALLS"), "{body}");
    assert_eq!(app.sandbox.stats().code_exchanges, 0);
    let kinds = app
        .db()
        .strings("SELECT kind FROM amocrm_oauth_attempts")
        .await;
    assert_eq!(kinds, [Some("widget_install".to_owned())]);
    app.stop().await;
}

async fn widget_install_answers_at_once_and_connects_in_the_background(backend: Backend) {
    let app = TestApp::spawn_with(
        &backend,
        Options {
            widget_installs: true,
            ..Options::default()
        },
    )
    .await;
    let code = app.sandbox.authorize(ACCOUNT_ID);
    let url = format!(
        "{}/amocrm/callback?code={code}&referer={ACCOUNT_HOST}&from_widget=1",
        app.base
    );

    let (status, _) = app.get(&url).await;

    assert_eq!(status, 200);
    let mut connected = 0;
    for _ in 0..100 {
        connected = app
            .count("SELECT COUNT(*) FROM amocrm_tokens WHERE account_id = 31337001")
            .await;
        if connected == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        connected, 1,
        "the widget install should connect the account"
    );
    let bad = format!(
        "{}/amocrm/callback?code={code}&referer=evil.com&from_widget=1",
        app.base
    );
    assert_eq!(app.get(&bad).await.0, 400);
    app.stop().await;
}

on_all_backends!(
    full_flow_without_cookies_stores_sealed_tokens_and_deletes_the_state,
    replayed_callback_is_refused_and_the_code_is_exchanged_once,
    concurrent_callbacks_with_one_state_connect_exactly_once,
    expired_state_is_refused_as_expired_without_an_exchange,
    unknown_and_malformed_states_are_refused_without_an_exchange,
    referers_outside_the_allow_list_make_no_outbound_request,
    access_denied_shows_a_clear_page_and_is_audited,
    amocrm_failures_are_reported_precisely_and_store_nothing,
    install_requires_the_admin_and_redirects_with_a_256_bit_state,
    browser_login_gives_a_session_cookie_that_opens_admin_pages,
    widget_installs_are_refused_unless_turned_on,
    widget_install_answers_at_once_and_connects_in_the_background,
);
