//! The real binary's logs, at the most verbose level, never contain a secret.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

/// Drives successes and failures through a real process and checks what it logged.
async fn secrets_stay_out_of_logs(log_format: &str) {
    // A free port for amoauth, known before it starts, because the sandbox needs the redirect URI.
    let port = free_port();
    let (sandbox, sandbox_origin) =
        spawn_sandbox(&format!("http://127.0.0.1:{port}/amocrm/callback")).await;
    let redirect_uri = format!("http://127.0.0.1:{port}/amocrm/callback");
    let dir = tempfile::tempdir().unwrap();
    let database_url = format!("sqlite://{}", dir.path().join("amoauth.db").display());
    let env = [
        ("AMOAUTH_AMOCRM_TIMEOUT", "500ms"),
        ("AMOAUTH_LOG_FORMAT", log_format),
        ("RUST_LOG", "trace"),
    ];
    let process =
        ServeProcess::start(port, &redirect_uri, &sandbox_origin, &database_url, &env).await;
    let client = http_client();
    let base = process.base.clone();

    // Log in as a browser would, and connect through the session.
    let login = client
        .post(format!("{base}/login"))
        .form(&[("token", ADMIN_TOKEN), ("next", "/")])
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let mut states = Vec::new();
    let mut connect = async |fault: Option<Fault>| {
        sandbox.set_token_fault(fault);
        let install = client
            .get(format!("{base}/amocrm/install"))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        let consent = location(&install);
        states.push(query_param(&consent, "state").unwrap());
        let mut form: Vec<(String, String)> = url::Url::parse(&consent)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect();
        form.extend([
            ("account_id".into(), ACCOUNT_ID.to_string()),
            ("decision".into(), "allow".into()),
        ]);
        let decided = client
            .post(format!("{sandbox_origin}/oauth/decide"))
            .form(&form)
            .send()
            .await
            .unwrap();
        let callback = location(&decided);
        let (status, _) = open_callback(&client, &callback).await;
        (callback, status)
    };
    let (callback, status) = connect(None).await;
    assert_eq!(status, 200);
    assert_eq!(open_callback(&client, &callback).await.0, 409);
    let (_, status) = connect(Some(Fault::Problem {
        status: 400,
        hint: "Authorization code has expired".into(),
    }))
    .await;
    assert_eq!(status, 502);
    let (_, status) = connect(Some(Fault::Delay(Duration::from_secs(1)))).await;
    assert_eq!(status, 504);
    let bad = callback.replace("referer=demo.amocrm.ru", "referer=evil.com");
    assert_eq!(client.get(&bad).send().await.unwrap().status(), 400);
    let session = cookie.split_once('=').unwrap().1.to_owned();
    // The token API, with a key made by the CLI: a hit and a miss.
    let created = amoauth_command(dir.path())
        .env("DATABASE_URL", &database_url)
        .args(["api-key", "create", "logs-test"])
        .output()
        .unwrap();
    let api_key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let token_url = format!("{base}/api/v1/connections/{ACCOUNT_ID}/token");
    assert_eq!(api_get(&client, &token_url, &api_key).await.0, 200);
    assert_eq!(
        api_get(&client, &token_url, "ak_0123456789abcdef_wrong")
            .await
            .0,
        401
    );
    // The gateway sends the access token to amoCRM: it is never logged on the way, at trace.
    let proxy_url = format!("{base}/api/v1/connections/{ACCOUNT_ID}/proxy/api/v4/leads");
    let created = client
        .post(&proxy_url)
        .bearer_auth(&api_key)
        .json(&serde_json::json!([{ "name": "Logged lead" }]))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let listed = client
        .get(&proxy_url)
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), 200);

    let logs = process.stop();

    assert!(
        !logs.contains("\x1b["),
        "no colour codes in logs written to a file:\n{logs}"
    );

    assert!(
        logs.contains("amoCRM connected"),
        "the success is logged:\n{logs}"
    );
    assert!(
        logs.contains("amocrm_timeout")
            && logs.contains("bad_referer")
            && logs.contains("used_state")
    );
    let mut secrets = vec![
        CLIENT_SECRET.to_owned(),
        ADMIN_TOKEN.to_owned(),
        session,
        api_key,
    ];
    secrets.extend(sandbox.issued_secrets());
    secrets.extend(states);
    assert!(
        secrets.len() >= 10,
        "codes, tokens and states were issued: {}",
        secrets.len()
    );
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "the log contains a secret ({}…)",
            &secret[..6]
        );
    }
    if log_format == "json" {
        let lines: Vec<serde_json::Value> = logs
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
            .collect();
        // The request log of the successful callback: request id, route, status, latency, account.
        let finished = lines
            .iter()
            .find(|line| {
                line["span"]["route"] == "/amocrm/callback"
                    && line["status"] == 303
                    && line["message"] == "finished processing request"
            })
            .unwrap_or_else(|| panic!("no request log line for the callback:\n{logs}"));
        assert_eq!(finished["span"]["account"], ACCOUNT_ID, "{finished}");
        assert!(!finished["latency"].is_null(), "{finished}");
        assert_eq!(
            finished["span"]["request_id"].as_str().map(str::len),
            Some(36),
            "{finished}"
        );
    }
}

#[tokio::test]
async fn text_logs_never_contain_secrets() {
    secrets_stay_out_of_logs("text").await;
}

#[tokio::test]
async fn json_logs_never_contain_secrets() {
    secrets_stay_out_of_logs("json").await;
}

/// Colours on a terminal, and never with `NO_COLOR`: the sandbox's start-up log line read
/// through a pseudo-terminal (`script` from util-linux, essential on Debian).
#[test]
fn text_logs_are_coloured_only_on_a_terminal_without_no_color() {
    let on_a_terminal = |no_color: Option<&str>| {
        let mut command = std::process::Command::new("script");
        command
            .args(["-qec"])
            .arg(format!(
                "timeout 2 {} sandbox --listen 127.0.0.1:0",
                env!("CARGO_BIN_EXE_amoauth")
            ))
            .arg("/dev/null")
            .env("AMOCRM_CLIENT_ID", CLIENT_ID)
            .env("AMOCRM_CLIENT_SECRET", CLIENT_SECRET)
            .env("AMOCRM_REDIRECT_URI", "http://127.0.0.1:1/amocrm/callback")
            .env_remove("NO_COLOR");
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        let output = command.output().expect("script(1) from util-linux");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let coloured = on_a_terminal(None);
    assert!(coloured.contains("amoCRM sandbox listening"), "{coloured}");
    assert!(
        coloured.contains("\x1b["),
        "a terminal gets colours: {coloured:?}"
    );
    let plain = on_a_terminal(Some("1"));
    assert!(plain.contains("amoCRM sandbox listening"), "{plain}");
    assert!(
        !plain.contains("\x1b["),
        "NO_COLOR turns them off: {plain:?}"
    );
}
