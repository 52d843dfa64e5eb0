//! Issue 13's HTTP hardening, on real sockets: where a login may send the browser, how the
//! admin token resists guessing, one-time login links, slow and greedy clients,
//! `X-Forwarded-For` with junk in it, and forged log lines.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::*;

/// POST /login with the admin token and `next`; where the browser is sent.
async fn login_redirect(app: &TestApp, next: &str) -> String {
    let response = app
        .client
        .post(format!("{}/login", app.base))
        .form(&[("token", ADMIN_TOKEN), ("next", next)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303, "{next:?}");
    location(&response)
}

/// Item 1: browsers strip tabs and newlines and read `\` as `/`, so `/\t/evil.example`
/// would become `//evil.example`; every such `next` lands on the dashboard instead.
#[tokio::test]
async fn login_never_redirects_to_another_site() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    for next in [
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r\n/evil.example",
        "/ /evil.example",
        "/\\evil.example",
        "\\/evil.example",
        "//evil.example",
        "///evil.example",
        "https://evil.example/",
        "/\u{0}/evil.example",
    ] {
        assert_eq!(login_redirect(&app, next).await, "/", "{next:?}");
    }
    assert_eq!(
        login_redirect(&app, "/amocrm/install?subdomain=demo").await,
        "/amocrm/install?subdomain=demo"
    );
    app.stop().await;
}

/// GET with `Authorization: Bearer <token>`; the status.
async fn bearer_get(app: &TestApp, path: &str, token: &str) -> u16 {
    app.client
        .get(format!("{}{path}", app.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Item 2: wrong Bearer tokens count in the login backoff; once it applies, even the right
/// token waits, so guessing cannot go on at full speed.
#[tokio::test]
async fn wrong_bearer_tokens_count_in_the_login_backoff() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let wrong = "wrong-admin-token-0123456789abcdef";
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(bearer_get(&app, "/", wrong).await);
    }
    assert_eq!(statuses[..6], [401; 6], "five typos free, the sixth locks");
    assert_eq!(statuses[6], 429, "{statuses:?}");
    let locked = app
        .client
        .get(format!("{}/", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), 429, "no guess is checked while locked");
    assert!(locked.headers().contains_key("retry-after"));
    // The login form shares the same backoff.
    let form = app
        .client
        .post(format!("{}/login", app.base))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 429);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(bearer_get(&app, "/", ADMIN_TOKEN).await, 200);
    app.stop().await;
}

/// Item 2: every admin route is rate limited, `GET /` included; the probes are not.
#[tokio::test]
async fn every_admin_route_is_rate_limited() {
    let app = TestApp::spawn_with(
        &Backend::Sqlite,
        Options {
            rate_limit: Some("1/s"),
            ..Options::default()
        },
    )
    .await;
    let statuses = [
        bearer_get(&app, "/", ADMIN_TOKEN).await,
        bearer_get(&app, "/", ADMIN_TOKEN).await,
        bearer_get(&app, "/", ADMIN_TOKEN).await,
    ];
    assert_eq!(statuses, [200, 200, 429], "a burst of two, then refused");
    for _ in 0..5 {
        assert_eq!(bearer_get(&app, "/healthz", ADMIN_TOKEN).await, 200);
    }
    app.stop().await;
}

/// Item 2: `serve` refuses an admin token shorter than 32 characters, in one line naming
/// the variable. The suite's own token is long enough.
#[test]
fn short_admin_tokens_are_refused_at_start() {
    assert!(ADMIN_TOKEN.chars().count() >= 32);
    let dir = tempfile::tempdir().unwrap();
    let mut child = amoauth_command(dir.path())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("a.db").display()),
        )
        .env("AMOCRM_CLIENT_ID", CLIENT_ID)
        .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
        .env("AMOCRM_REDIRECT_URI", "https://example.ru/amocrm/callback")
        .env("AMOAUTH_ADMIN_TOKEN", "0123456789abcdef0123456789abcde")
        .env("AMOAUTH_LISTEN", format!("127.0.0.1:{}", free_port()))
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A server that accepted the token would run on: give it 10 s to refuse.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve started with a 31-character admin token");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8(output.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("AMOAUTH_ADMIN_TOKEN"), "{stderr}");
    assert!(lines[0].contains("at least 32 characters"), "{stderr}");
    assert!(
        !stderr.contains("0123456789abcdef0123456789abcde"),
        "the value is not echoed"
    );
}

/// Item 2: `serve` without an admin token prints a one-time login link under the base path,
/// never the token.
#[tokio::test]
async fn serve_prints_a_login_link_under_the_base_path() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, origin) = spawn_sandbox(&redirect_uri).await;
    let process = ServeProcess::start(
        port,
        &redirect_uri,
        &origin,
        &database_url,
        &[("AMOAUTH_ADMIN_TOKEN", ""), ("AMOAUTH_BASE_PATH", "/auth/")],
    )
    .await;
    let output = process.output_with("Log in at: ").await;
    let url = output
        .lines()
        .find_map(|line| line.strip_prefix("Log in at: "))
        .unwrap_or_else(|| panic!("no login link printed:\n{output}"))
        .to_owned();
    assert!(
        url.starts_with(&format!("{}/auth/login?link=", process.base)),
        "{url}"
    );
    let client = http_client();
    let login = client.get(&url).send().await.unwrap();
    assert_eq!(login.status(), 303);
    assert_eq!(location(&login), "/auth/");
    let again = client.get(&url).send().await.unwrap();
    assert_eq!(again.status(), 401, "single use");
}

/// Item 2: a login link opens a session once, on any backend; an expired or unknown one
/// never does, and each failure counts in the backoff.
async fn login_links_work_once_and_expire(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let link = amoauth::internal::new_login_link(app.store(), &app.base)
        .await
        .unwrap();
    let first = app.client.get(&link).send().await.unwrap();
    assert_eq!(first.status(), 303);
    assert!(
        first.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .starts_with("amoauth_session=")
    );
    let second = app.client.get(&link).send().await.unwrap();
    assert_eq!(second.status(), 401, "single use");

    let expired = "expired-link-token";
    app.store()
        .insert_login_link(
            &amoauth::internal::sha256_hex(expired),
            amoauth::internal::now() - chrono::Duration::seconds(1),
        )
        .await
        .unwrap();
    let response = app
        .client
        .get(format!("{}/login?link={expired}", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401, "expired");
    assert_eq!(app.count("SELECT COUNT(*) FROM amoauth_sessions").await, 1);
    app.stop().await;
}

on_all_backends!(login_links_work_once_and_expire);

/// Reads from `stream` until the server closes it or answers; what it sent and when.
async fn read_until_closed(stream: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// Sends `head`, then trickles `trickle` a byte every 100 ms until the server closes the
/// connection; what the server sent and how long it took. Gives up after 8 s.
async fn trickle(addr: &str, head: &str, trickle: &[u8]) -> (String, Duration) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    writer.write_all(head.as_bytes()).await.unwrap();
    let trickle = trickle.to_vec();
    let writing = tokio::spawn(async move {
        for byte in trickle {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if writer.write_all(&[byte]).await.is_err() {
                break;
            }
        }
        // Keep the connection open without sending more.
        std::future::pending::<()>().await;
    });
    let answer = tokio::time::timeout(Duration::from_secs(8), read_until_closed(&mut reader)).await;
    writing.abort();
    let answer = answer.unwrap_or_else(|_| panic!("still connected after 8 s: no read timeout"));
    (answer, started.elapsed())
}

/// Item 8: a client that sends its request head a byte at a time is cut off after
/// AMOAUTH_READ_TIMEOUT.
#[tokio::test]
async fn a_trickled_request_head_is_cut_off() {
    let app = TestApp::spawn_with(
        &Backend::Sqlite,
        Options {
            read_timeout: Some("1s"),
            ..Options::default()
        },
    )
    .await;
    let addr = app.base.strip_prefix("http://").unwrap().to_owned();
    let (_, took) = trickle(
        &addr,
        "GET /healthz HTTP/1.1\r\nHost: amoauth\r\n",
        &[b'x'; 200],
    )
    .await;
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    app.stop().await;
}

/// Item 8: a body trickled a byte at a time is answered 408 and the connection closed after
/// AMOAUTH_READ_TIMEOUT, not after the route timeout.
#[tokio::test]
async fn a_trickled_body_is_answered_408_and_cut_off() {
    let app = TestApp::spawn_with(
        &Backend::Sqlite,
        Options {
            read_timeout: Some("1s"),
            ..Options::default()
        },
    )
    .await;
    let addr = app.base.strip_prefix("http://").unwrap().to_owned();
    let (answer, took) = trickle(
        &addr,
        "POST /login HTTP/1.1\r\nHost: amoauth\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
        &[b'a'; 1000],
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(took < Duration::from_secs(3), "cut after {took:?}");
    app.stop().await;
}

/// Item 8: one address holding all of its request slots (bodies trickling) waits for more,
/// while another address is served at once.
#[tokio::test]
async fn one_address_holding_its_slots_does_not_stop_another() {
    let app = TestApp::spawn_with(
        &Backend::Sqlite,
        Options {
            per_ip_concurrency: Some("2"),
            read_timeout: Some("20s"),
            trusted_proxies: Some("127.0.0.1"),
            ..Options::default()
        },
    )
    .await;
    let addr = app.base.strip_prefix("http://").unwrap().to_owned();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(
                b"POST /login HTTP/1.1\r\nHost: amoauth\r\nX-Forwarded-For: 203.0.113.1\r\n\
                  Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nt",
            )
            .await
            .unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = |ip: &'static str| {
        app.client
            .get(format!("{}/healthz", app.base))
            .header("x-forwarded-for", ip)
            .timeout(Duration::from_secs(1))
            .send()
    };
    assert!(
        health("203.0.113.1").await.is_err(),
        "its two slots are taken: a third request waits"
    );
    let other = health("203.0.113.2").await.unwrap();
    assert_eq!(other.status(), 200, "another address is served");
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let freed = health("203.0.113.1").await.unwrap();
    assert_eq!(freed.status(), 200, "the slots are freed");
    app.stop().await;
}

/// Item 9: a junk entry in `X-Forwarded-For` is skipped; the client is still identified, not
/// mistaken for the proxy.
#[tokio::test]
async fn a_junk_forwarded_for_entry_does_not_hide_the_client() {
    let app = TestApp::spawn_with(
        &Backend::Sqlite,
        Options {
            trusted_proxies: Some("127.0.0.1"),
            ..Options::default()
        },
    )
    .await;
    let install = app
        .client
        .get(format!("{}/amocrm/install", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-forwarded-for", "198.51.100.7, unknown")
        .send()
        .await
        .unwrap();
    assert_eq!(install.status(), 303);
    assert_eq!(
        app.db()
            .strings("SELECT ip FROM amocrm_oauth_attempts WHERE kind = 'install'")
            .await,
        [Some("198.51.100.7".to_owned())]
    );
    app.stop().await;
}

/// Item 13: a newline in the callback's `error` parameter is escaped in the text log, so it
/// cannot start a line of its own.
#[tokio::test]
async fn a_newline_in_the_callback_error_cannot_forge_a_log_line() {
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let (_sandbox, origin) = spawn_sandbox(&redirect_uri).await;
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let process = ServeProcess::start(
        port,
        &redirect_uri,
        &origin,
        &database_url,
        &[("AMOAUTH_LOG_FORMAT", "text")],
    )
    .await;
    let callback = format!(
        "{}/amocrm/callback?state=x&error=nope%0AFORGED%20INFO%20admin%20logged%20in%0D%1B%5B2K",
        process.base
    );
    let (status, _) = open_callback(&http_client(), &callback).await;
    assert_eq!(status, 400);
    let output = process.output_with("callback failed").await;
    assert!(output.contains("callback failed"), "{output}");
    assert!(
        output.lines().all(|line| !line.starts_with("FORGED")),
        "a forged line:\n{output}"
    );
    assert!(output.contains(r"nope\nFORGED"), "{output}");
    assert!(
        !output.contains('\r') && !output.contains('\u{1b}'),
        "{output:?}"
    );
}

/// Every answer carries an `X-Request-Id` (README, "Logs"): the client's own when it sent
/// one, else a new one shaped like a random UUID, never the same twice.
#[tokio::test]
async fn every_answer_carries_the_clients_request_id_or_a_new_one() {
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let request_id = |response: &reqwest::Response| {
        response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let response = app
            .client
            .get(format!("{}/healthz", app.base))
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        let uuid_shaped = id.len() == 36
            && id.char_indices().all(|(at, c)| match at {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
            });
        assert!(uuid_shaped, "{id}");
        assert_eq!(&id[14..15], "4", "version 4: {id}");
        assert!("89ab".contains(&id[19..20]), "RFC 9562 variant: {id}");
        assert!(seen.insert(id.clone()), "{id} twice");
    }
    let response = app
        .client
        .get(format!("{}/healthz", app.base))
        .header("x-request-id", "from-the-client-7")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&response), "from-the-client-7");
    app.stop().await;
}
