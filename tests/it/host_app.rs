//! What the host app and the operator's tools see: connect links, the OpenAPI document.

use std::collections::BTreeSet;

use amoauth::sandbox::Fault;

use crate::support::*;

const RETURN_ORIGIN: &str = "https://app.example.com";

async fn connect_link(
    app: &TestApp,
    key: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = app
        .client
        .post(format!("{}/api/v1/connect-links", app.base))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

async fn a_connect_link_returns_to_the_host_app_with_its_tenant(backend: Backend) {
    let options = Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let key = app.api_key().await;
    let return_url = format!("{RETURN_ORIGIN}/amo/done?from=settings");

    let (status, link) = connect_link(
        &app,
        &key,
        serde_json::json!({ "external_id": "tenant-42", "return_url": return_url }),
    )
    .await;

    assert_eq!(status, 201, "{link}");
    let url = link["url"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("{}/oauth?", app.sandbox_origin)),
        "{url}"
    );
    assert!(link["expires_at"].as_str().unwrap().ends_with('Z'));
    let callback = app.consent(url, "allow").await;
    let response = app.client.get(&callback).send().await.unwrap();
    assert_eq!(response.status(), 303);
    let back = location(&response);
    assert!(back.starts_with(&return_url), "{back}");
    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("connected")
    );
    assert_eq!(
        query_param(&back, "account_id").as_deref(),
        Some("31337001")
    );
    assert_eq!(
        query_param(&back, "external_id").as_deref(),
        Some("tenant-42")
    );
    assert_eq!(
        query_param(&back, "from").as_deref(),
        Some("settings"),
        "the app's own query stays"
    );
    assert_eq!(
        app.db()
            .string("SELECT external_id FROM amocrm_tokens")
            .await,
        "tenant-42"
    );
    let (status, mine) = app
        .api("/api/v1/connections?external_id=tenant-42", &key)
        .await;
    assert_eq!(status, 200);
    assert_eq!(mine.as_array().unwrap().len(), 1);
    assert_eq!(mine[0]["external_id"], "tenant-42");
    let (_, others) = app
        .api("/api/v1/connections?external_id=tenant-7", &key)
        .await;
    assert_eq!(others.as_array().unwrap().len(), 0);

    // A failure after consent is reported to the app too.
    let (_, link) = connect_link(
        &app,
        &key,
        serde_json::json!({ "external_id": "tenant-42", "return_url": return_url }),
    )
    .await;
    let callback = app.consent(link["url"].as_str().unwrap(), "allow").await;
    app.sandbox.set_token_fault(Some(Fault::ServerError));
    let back = location(&app.client.get(&callback).send().await.unwrap());
    assert_eq!(
        query_param(&back, "amoauth_status").as_deref(),
        Some("error")
    );
    assert_eq!(
        query_param(&back, "reason").as_deref(),
        Some("amocrm_error")
    );
    app.stop().await;
}

async fn return_urls_outside_the_allow_list_are_refused(backend: Backend) {
    let options = Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let key = app.api_key().await;
    for return_url in [
        "https://evil.example.com/amo",
        "https://app.example.com.evil.com/amo",
        "http://app.example.com/amo",
        "https://app.example.com:8443/amo",
        "//app.example.com/amo",
        "/amo/done",
        "javascript:alert(1)",
        "https://app.example.com\r\nSet-Cookie: x=1",
        "",
    ] {
        let (status, body) = connect_link(
            &app,
            &key,
            serde_json::json!({ "external_id": "t", "return_url": return_url }),
        )
        .await;
        assert_eq!(status, 422, "{return_url:?}: {body}");
        assert_eq!(body["error"], "return_url_not_allowed");
    }
    let (status, _) = connect_link(
        &app,
        &key,
        serde_json::json!({ "return_url": RETURN_ORIGIN }),
    )
    .await;
    assert_eq!(status, 400, "external_id is required");
    let anonymous = app
        .client
        .post(format!("{}/api/v1/connect-links", app.base))
        .json(&serde_json::json!({ "external_id": "t", "return_url": RETURN_ORIGIN }))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(
        app.count("SELECT COUNT(*) FROM amocrm_oauth_states").await,
        0,
        "no state was made"
    );
    app.stop().await;
}

async fn post_message_mode_reports_to_the_opener_of_that_origin_only(backend: Backend) {
    let options = Options {
        return_origins: Some(RETURN_ORIGIN),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let key = app.api_key().await;
    let body = serde_json::json!({
        "external_id": "</script><script>alert(1)</script>",
        "return_url": format!("{RETURN_ORIGIN}/amo"),
        "mode": "post_message",
    });
    let (status, link) = connect_link(&app, &key, body).await;
    assert_eq!(status, 201);
    let url = link["url"].as_str().unwrap();
    assert_eq!(query_param(url, "mode").as_deref(), Some("post_message"));
    let callback = app.consent(url, "allow").await;

    let result = result_url(&app.client, &callback).await;
    let response = app.client.get(&result).send().await.unwrap();
    let (status, csp) = (
        response.status(),
        response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned(),
    );
    let page = response.text().await.unwrap();

    assert_eq!(status, 200);
    assert!(page.contains("window.opener.postMessage("), "{page}");
    let script = page
        .split("<script>")
        .nth(1)
        .unwrap()
        .split("</script>")
        .next()
        .unwrap();
    let hash = {
        use base64::Engine as _;
        use sha2::Digest as _;
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script.as_bytes()))
    };
    assert!(
        csp.contains(&format!("script-src 'sha256-{hash}'")),
        "only this script may run: {csp}"
    );
    assert!(
        page.contains(r#", "https://app.example.com"); window.close();"#),
        "{page}"
    );
    assert!(page.contains(r#""amoauth_status":"connected""#));
    assert!(
        !page.contains("</script><script>alert(1)"),
        "values cannot close the script: {page}"
    );
    // A reload shows the same page (the same report), not a used_state error.
    let (status, reloaded) = app.get(&result).await;
    assert_eq!((status, reloaded), (200, page));
    assert_eq!(app.callback_reasons().await, ["-"]);
    app.stop().await;
}

on_all_backends!(
    a_connect_link_returns_to_the_host_app_with_its_tenant,
    return_urls_outside_the_allow_list_are_refused,
    post_message_mode_reports_to_the_opener_of_that_origin_only,
);

/// Every `/api/` route in the router's source is in the OpenAPI document, and nothing else.
#[tokio::test]
async fn the_openapi_document_describes_every_json_route() {
    let source = include_str!("../../src/http/mod.rs");
    let mut routed = BTreeSet::new();
    for chunk in source.split(".route(").skip(1) {
        let Some(chunk) = chunk.trim_start().strip_prefix('"') else {
            continue;
        };
        let (path, rest) = chunk.split_once('"').unwrap();
        // The router's catch-all `{*path}` is OpenAPI's `{path}`.
        let path = &path.replace("{*", "{");
        if !path.starts_with("/api/") {
            continue;
        }
        let handlers = rest.split(".route(").next().unwrap();
        for method in ["get", "post", "put", "patch", "delete"] {
            if handlers.contains(&format!("{method}(")) {
                routed.insert(format!("{method} {path}"));
            }
        }
    }
    assert!(routed.len() >= 4, "the scan found the routes: {routed:?}");
    let app = TestApp::spawn(&Backend::Sqlite).await;
    let response = app
        .client
        .get(format!("{}/api/v1/openapi.json", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let document: serde_json::Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let mut documented = BTreeSet::new();
    for (path, operations) in document["paths"].as_object().unwrap() {
        for method in operations.as_object().unwrap().keys() {
            documented.insert(format!("{method} {path}"));
        }
    }
    assert_eq!(routed, documented);
    app.stop().await;
}

/// Logs in as a browser would; returns the `name=value` session cookie.
async fn log_in(app: &TestApp) -> String {
    let response = app
        .client
        .post(format!("{}/login", app.base))
        .form(&[("token", ADMIN_TOKEN), ("next", "/")])
        .send()
        .await
        .unwrap();
    let cookie = response.headers()["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

async fn the_dashboard_marks_replays_and_its_actions_need_the_csrf_token(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    assert_eq!(app.open_callback(&callback).await.0, 200);
    assert_eq!(app.open_callback(&callback).await.0, 409);
    let cookie = log_in(&app).await;

    let page = app
        .client
        .get(format!("{}/", app.base))
        .header("cookie", &cookie)
        .header("accept-language", "en")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(
        page.contains("Демо-аккаунт") && page.contains("demo.amocrm.ru"),
        "{page}"
    );
    assert!(
        page.contains("a used link replayed"),
        "the replay is marked: {page}"
    );
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("forms carry a CSRF token")
        .to_owned();
    let refresh = format!("{}/connections/{ACCOUNT_ID}/refresh", app.base);
    let forged = app
        .client
        .post(&refresh)
        .header("cookie", &cookie)
        .form(&[("csrf", "0".repeat(64))])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    let missing = app
        .client
        .post(&refresh)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert!(missing.status().is_client_error());
    assert_eq!(
        app.sandbox.stats().refreshes,
        0,
        "refused actions do nothing"
    );

    let refreshed = app
        .client
        .post(&refresh)
        .header("cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();

    assert_eq!(refreshed.status(), 303);
    assert_eq!(location(&refreshed), "/?done=refreshed");
    assert_eq!(app.sandbox.stats().successful_refreshes, 1);
    // An API client with the admin token has no cookie to forge, so no CSRF token is needed.
    let disconnected = app
        .client
        .post(format!("{}/connections/{ACCOUNT_ID}/disconnect", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(disconnected.status(), 303);
    assert_eq!(
        app.db().string("SELECT status FROM amocrm_tokens").await,
        "disconnected"
    );
    app.stop().await;
}

on_all_backends!(the_dashboard_marks_replays_and_its_actions_need_the_csrf_token);
