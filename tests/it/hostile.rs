//! Malformed and malicious requests: each gets a 4xx (never a 5xx), sends nothing to amoCRM
//! and leaves states, connections, sessions and keys as they were (failures are audited).

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::*;

/// Sends `request` byte for byte (no client normalises it); the status code and the
/// Location header, if any.
async fn raw(app: &TestApp, request: &[u8]) -> (u16, Option<String>) {
    let address = app.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // The head is all we need; stop reading once it is in.
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&answer);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let location = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("location")
            .then(|| value.trim().to_owned())
    });
    (status, location)
}

fn get(target: &str, extra_headers: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}Connection: close\r\n\r\n")
        .into_bytes()
}

fn post(target: &str, content_type: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "POST {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Row counts that no hostile request may change.
async fn guarded_rows(app: &TestApp) -> Vec<i64> {
    let mut counts = Vec::new();
    for sql in [
        "SELECT COUNT(*) FROM amocrm_oauth_states",
        "SELECT COUNT(*) FROM amocrm_tokens",
        "SELECT version FROM amocrm_tokens",
        "SELECT COUNT(*) FROM amoauth_sessions",
        "SELECT COUNT(*) FROM amoauth_api_keys WHERE revoked_at IS NULL",
        "SELECT COUNT(*) FROM amocrm_tokens WHERE status = 'active'",
    ] {
        counts.push(app.count(sql).await);
    }
    counts
}

#[tokio::test]
async fn hostile_requests_get_4xx_touch_nothing_and_reach_no_one() {
    let options = Options {
        return_origins: Some("https://app.example.com"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&Backend::Sqlite, options).await;
    app.connect().await;
    let key = app.api_key().await;
    let consent = app.install().await;
    let state = query_param(&consent, "state").unwrap();
    let before = guarded_rows(&app).await;
    let outbound_before = app.sandbox.stats().requests;
    let bearer = format!("Authorization: Bearer {key}\r\n");
    let cb = |query: &str| get(&format!("/amocrm/callback?{query}"), "");
    let long = "a".repeat(5000);
    let cookie = format!("Cookie: amoauth_session={}\r\n", "x".repeat(7000));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "SQL in state",
            cb("code=c&referer=demo.amocrm.ru&state=%27%20OR%20%271%27%3D%271"),
        ),
        (
            "SQL drop in state",
            cb(
                "code=c&referer=demo.amocrm.ru&state=%22%3B%20DROP%20TABLE%20amocrm_oauth_states%3B%20--",
            ),
        ),
        (
            "NUL in state",
            cb(&format!("code=c&referer=demo.amocrm.ru&state={state}%00")),
        ),
        (
            "NUL in code",
            cb(&format!("code=c%00d&referer=demo.amocrm.ru&state={state}")),
        ),
        (
            "overlong state",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru&state={}",
                "f".repeat(300)
            )),
        ),
        (
            "overlong code",
            cb(&format!("code={long}&referer=demo.amocrm.ru&state={state}")),
        ),
        (
            "overlong referer",
            cb(&format!("code=c&referer={long}.amocrm.ru&state={state}")),
        ),
        (
            "repeated state",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru&state={state}&state={state}"
            )),
        ),
        (
            "repeated code",
            cb(&format!(
                "code=c&code=d&referer=demo.amocrm.ru&state={state}"
            )),
        ),
        (
            "repeated referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru&referer=evil.com&state={state}"
            )),
        ),
        (
            "Cyrillic look-alike referer",
            cb(&format!("code=c&referer=demo.%D0%B0mocrm.ru&state={state}")),
        ),
        (
            "punycode referer",
            cb(&format!(
                "code=c&referer=xn--dmo-jdd.amocrm.ru.evil.com&state={state}"
            )),
        ),
        (
            "encoded dot referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%2eevil.com&state={state}"
            )),
        ),
        (
            "encoded NUL referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%00.evil.com&state={state}"
            )),
        ),
        (
            "userinfo referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%40evil.com&state={state}"
            )),
        ),
        (
            "scheme referer",
            cb(&format!(
                "code=c&referer=https%3A%2F%2Fdemo.amocrm.ru&state={state}"
            )),
        ),
        (
            "port referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%3A443&state={state}"
            )),
        ),
        (
            "path referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%2F..%2F&state={state}"
            )),
        ),
        (
            "backslash referer",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru%5Cevil.com&state={state}"
            )),
        ),
        (
            "uppercase referer",
            cb(&format!("code=c&referer=DEMO.AMOCRM.RU&state={state}")),
        ),
        (
            "IP referer",
            cb(&format!("code=c&referer=127.0.0.1&state={state}")),
        ),
        (
            "bad percent-encoding",
            cb("code=c&referer=demo.amocrm.ru&state=%ZZ%G1"),
        ),
        (
            "unknown error",
            cb(&format!("error=%3Cscript%3E&state={state}")),
        ),
        (
            "repeated error",
            cb("error=access_denied&error=server_error"),
        ),
        ("empty callback", cb("")),
        (
            "foreign client_id",
            cb(&format!(
                "code=c&referer=demo.amocrm.ru&state={state}&client_id=other"
            )),
        ),
        (
            "widget install while off",
            cb("code=c&referer=demo.amocrm.ru&from_widget=1"),
        ),
        (
            "webhook SQL account",
            get(
                "/amocrm/webhook/uninstall?client_uuid=test-client-id&account_id=1%20OR%201%3D1&signature=00",
                "",
            ),
        ),
        (
            "webhook huge account",
            get(
                &format!(
                    "/amocrm/webhook/uninstall?client_uuid=test-client-id&account_id={}&signature=00",
                    "9".repeat(40)
                ),
                "",
            ),
        ),
        (
            "webhook negative account",
            get(
                "/amocrm/webhook/uninstall?client_uuid=test-client-id&account_id=-31337001&signature=00",
                "",
            ),
        ),
        (
            "webhook short signature",
            get(
                "/amocrm/webhook/uninstall?client_uuid=test-client-id&account_id=31337001&signature=00",
                "",
            ),
        ),
        (
            "webhook repeated account",
            get(
                "/amocrm/webhook/uninstall?client_uuid=test-client-id&account_id=31337001&account_id=1&signature=00",
                "",
            ),
        ),
        (
            "webhook overlong uuid",
            get(
                &format!(
                    "/amocrm/webhook/uninstall?client_uuid={long}&account_id=31337001&signature=00"
                ),
                "",
            ),
        ),
        ("webhook nothing", get("/amocrm/webhook/uninstall", "")),
        (
            "install without auth",
            get("/amocrm/install?subdomain=demo", ""),
        ),
        (
            "install traversal subdomain",
            get(
                "/amocrm/install?subdomain=..%2F..%2Fetc",
                &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"),
            ),
        ),
        (
            "install foreign subdomain",
            get(
                "/amocrm/install?subdomain=evil.com",
                &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"),
            ),
        ),
        (
            "install bad mode",
            get(
                "/amocrm/install?mode=javascript",
                &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"),
            ),
        ),
        (
            "wrong admin token",
            get("/amocrm/install", "Authorization: Bearer ' OR 1=1 --\r\n"),
        ),
        ("oversized cookie", get("/", &cookie)),
        (
            "forged session cookie",
            get("/", "Cookie: amoauth_session=../../../../etc/passwd\r\n"),
        ),
        ("path traversal", get("/amocrm/../../../../etc/passwd", "")),
        (
            "encoded traversal",
            get("/amocrm/%2e%2e/%2e%2e/etc/passwd", ""),
        ),
        (
            "login SQL token",
            post(
                "/login",
                "application/x-www-form-urlencoded",
                "token=%27%20OR%20%271%27%3D%271&next=%2F%2Fevil.com",
                "",
            ),
        ),
        (
            "login oversized body",
            post(
                "/login",
                "application/x-www-form-urlencoded",
                &format!("token={}", "a".repeat(40_000)),
                "",
            ),
        ),
        (
            "dashboard action without auth",
            post(
                "/connections/31337001/disconnect",
                "application/x-www-form-urlencoded",
                "csrf=x",
                "",
            ),
        ),
        (
            "connect link header injection",
            post(
                "/api/v1/connect-links",
                "application/json",
                r#"{"external_id":"t","return_url":"https://app.example.com/\r\nSet-Cookie: a=1"}"#,
                &bearer,
            ),
        ),
        (
            "connect link foreign origin",
            post(
                "/api/v1/connect-links",
                "application/json",
                r#"{"external_id":"t","return_url":"https://app.example.com.evil.com/"}"#,
                &bearer,
            ),
        ),
        (
            "connect link javascript",
            post(
                "/api/v1/connect-links",
                "application/json",
                r#"{"external_id":"t","return_url":"javascript:alert(1)"}"#,
                &bearer,
            ),
        ),
        (
            "connect link NUL tenant",
            post(
                "/api/v1/connect-links",
                "application/json",
                r#"{"external_id":"t\u0000","return_url":"https://app.example.com/"}"#,
                &bearer,
            ),
        ),
        (
            "connect link broken JSON",
            post(
                "/api/v1/connect-links",
                "application/json",
                r#"{"external_id": "#,
                &bearer,
            ),
        ),
        (
            "connect link huge body",
            post(
                "/api/v1/connect-links",
                "application/json",
                &format!(
                    r#"{{"external_id":"{}","return_url":"https://app.example.com/"}}"#,
                    "t".repeat(40_000)
                ),
                &bearer,
            ),
        ),
        (
            "token API SQL account",
            get("/api/v1/connections/1%20OR%201%3D1/token", &bearer),
        ),
        (
            "token API traversal",
            get("/api/v1/connections/..%2F..%2Fetc/token", &bearer),
        ),
        (
            "token API without key",
            get("/api/v1/connections/31337001/token", ""),
        ),
        (
            "token API malformed key",
            get(
                "/api/v1/connections/31337001/token",
                "Authorization: Bearer ak_zz_zz\r\n",
            ),
        ),
        (
            "token API admin token as key",
            get(
                "/api/v1/connections/31337001/token",
                &format!("Authorization: Bearer {ADMIN_TOKEN}\r\n"),
            ),
        ),
        (
            "overlong URL",
            get(
                &format!("/amocrm/callback?state={}", "a".repeat(70_000)),
                "",
            ),
        ),
    ];
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut refused = std::collections::BTreeMap::new();
    for (name, request) in &cases {
        let (mut status, location) = raw(&app, request).await;
        // A callback with a verdict on its state or amoCRM's answer moves to its result page
        // (Post/Redirect/Get); that page must then refuse it.
        if status == 303
            && let Some(result) = location.filter(|l| l.starts_with(RESULT_PATH))
        {
            assert!(!result.contains(&state), "{name}: {result}");
            status = raw(&app, &get(&result, "")).await.0;
        }
        assert!((400..500).contains(&status), "{name}: answered {status}");
        *refused.entry(status).or_insert(0) += 1;
    }
    eprintln!("{} hostile requests, statuses: {refused:?}", cases.len());

    assert_eq!(
        app.sandbox.stats().requests,
        outbound_before,
        "nothing reached amoCRM"
    );
    assert_eq!(
        guarded_rows(&app).await,
        before,
        "no state, connection, session or key changed"
    );
    // The real state still works: none of the forgeries consumed it.
    let code = app.sandbox.authorize(ACCOUNT_ID);
    let url = format!(
        "{}/amocrm/callback?code={code}&state={state}&referer={ACCOUNT_HOST}",
        app.base
    );
    assert_eq!(app.open_callback(&url).await.0, 200);
    app.stop().await;
}
