//! Post/Redirect/Get after the callback: the browser ends on a result address without the code
//! or the state, and reloading it shows the same page without running the callback again.

use std::time::Duration;

use amoauth::sandbox::Fault;

use crate::support::*;

/// What a reload must leave as it was: audit rows, replays and the flow counters.
async fn tally(app: &TestApp) -> (i64, i64, Vec<String>) {
    let attempts = app
        .count("SELECT COUNT(*) FROM amocrm_oauth_attempts")
        .await;
    let replays = app
        .count("SELECT COUNT(*) FROM amocrm_oauth_attempts WHERE reason = 'used_state'")
        .await;
    let metrics = app.get(&format!("{}/metrics", app.base)).await.1;
    let flows = metrics
        .lines()
        .filter(|line| line.starts_with("amoauth_flows_"))
        .map(str::to_owned)
        .collect();
    (attempts, replays, flows)
}

/// GETs `url` with the browser's language; status, Cache-Control, CSP and body.
async fn page(app: &TestApp, url: &str, language: &str) -> (u16, String, String, String) {
    let response = app
        .client
        .get(url)
        .header("accept-language", language)
        .send()
        .await
        .unwrap();
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
    let (cache, csp) = (header("cache-control"), header("content-security-policy"));
    let status = response.status().as_u16();
    (status, cache, csp, response.text().await.unwrap())
}

async fn a_connected_callback_ends_on_a_result_page_that_survives_reloads(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    let code = query_param(&callback, "code").unwrap();
    let state = query_param(&callback, "state").unwrap();

    let result = result_url(&app.client, &callback).await;

    assert!(result.starts_with(&format!("{}{RESULT_PATH}", app.base)));
    let mut hidden = vec![code, state, ACCOUNT_ID.to_string(), "Демо".into()];
    hidden.push(url::form_urlencoded::byte_serialize("Демо".as_bytes()).collect());
    hidden.extend(app.sandbox.issued_secrets());
    for secret in &hidden {
        assert!(!result.contains(secret.as_str()), "{secret} in {result}");
    }
    let (status, cache, csp, first) = page(&app, &result, "ru").await;
    assert_eq!(status, 200, "{first}");
    assert!(first.contains("amoCRM успешно подключена!"), "{first}");
    assert!(first.contains("Демо-аккаунт") && first.contains(ACCOUNT_HOST));
    assert_eq!(cache, "no-store");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'none'"),
        "{csp}"
    );
    let before = tally(&app).await;
    assert_eq!(before.0, 2, "the install and the callback");

    for _ in 0..3 {
        let (status, _, _, again) = page(&app, &result, "ru").await;
        assert_eq!((status, again.as_str()), (200, first.as_str()));
    }
    let (status, _, _, english) = page(&app, &result, "en-US,en;q=0.9").await;
    assert_eq!(status, 200);
    assert!(
        english.contains("amoCRM connected successfully!"),
        "{english}"
    );

    assert_eq!(tally(&app).await, before, "reloads run nothing");
    assert_eq!(before.1, 0, "no used_state");
    assert!(
        before
            .2
            .contains(&"amoauth_flows_completed_total{platform=\"amocrm\"} 1".to_owned()),
        "{:?}",
        before.2
    );
    assert_eq!(app.sandbox.stats().code_exchanges, 1);
    let dashboard = app
        .client
        .get(format!("{}/", app.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(dashboard.contains("Демо-аккаунт"), "{dashboard}");
    assert!(
        !dashboard.contains("tr class=\"suspicious\""),
        "a reload is not suspicious: {dashboard}"
    );
    app.stop().await;
}

async fn a_failed_callback_ends_on_a_result_page_with_the_same_precise_error(backend: Backend) {
    let app = TestApp::spawn(&backend).await;
    let callback = app.allowed_callback_url().await;
    app.sandbox.set_token_fault(Some(Fault::Problem {
        status: 400,
        hint: "Authorization code has been revoked".into(),
    }));

    let result = result_url(&app.client, &callback).await;

    let state = query_param(&callback, "state").unwrap();
    assert!(
        !result.contains(&state) && !result.contains("revoked"),
        "{result}"
    );
    let (status, _, _, first) = page(&app, &result, "ru").await;
    assert_eq!(status, 502, "{first}");
    assert!(
        first.contains("amoCRM отклонила запрос")
            && first.contains("Authorization code has been revoked")
            && first.contains("amocrm_rejected"),
        "{first}"
    );
    let before = tally(&app).await;
    for _ in 0..2 {
        let (status, _, _, again) = page(&app, &result, "ru").await;
        assert_eq!((status, again.as_str()), (502, first.as_str()));
    }
    assert_eq!(tally(&app).await, before);
    assert_eq!(app.callback_reasons().await, ["amocrm_rejected"]);

    // Replaying the callback itself is a new attempt (used_state), shown the same way.
    let replay = result_url(&app.client, &callback).await;
    let (status, _, _, refused) = page(&app, &replay, "ru").await;
    assert_eq!(status, 409);
    assert!(refused.contains("Ссылка уже использована"), "{refused}");
    let after_replay = tally(&app).await;
    assert_eq!(after_replay.1, 1);
    assert_eq!(page(&app, &replay, "ru").await.3, refused);
    assert_eq!(tally(&app).await, after_replay);
    assert_eq!(app.sandbox.stats().code_exchanges, 1);
    app.stop().await;
}

async fn an_expired_or_altered_result_address_says_the_result_is_gone(backend: Backend) {
    // Result addresses live as long as a state: one second here.
    let options = Options {
        state_ttl: Some("1s"),
        ..Options::default()
    };
    let app = TestApp::spawn_with(&backend, options).await;
    let result = result_url(&app.client, &app.allowed_callback_url().await).await;
    assert_eq!(page(&app, &result, "ru").await.0, 200);
    let before = tally(&app).await;
    let token = query_param(&result, "r").unwrap();
    // One character of the ciphertext changed: the seal no longer opens.
    let flipped: String = {
        let mut bytes = token.into_bytes();
        let middle = bytes.len() / 2;
        bytes[middle] = if bytes[middle] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let altered = format!("{}{RESULT_PATH}{flipped}", app.base);
    let bare = format!("{}/amocrm/callback/result", app.base);

    tokio::time::sleep(Duration::from_millis(1100)).await;

    for url in [&result, &altered, &bare] {
        let (status, cache, _, gone) = page(&app, url, "ru").await;
        assert_eq!(status, 410, "{url}: {gone}");
        assert_eq!(cache, "no-store");
        assert!(gone.contains("Результат больше недоступен"), "{gone}");
        assert!(
            gone.contains(r#"href="/""#),
            "points to the dashboard: {gone}"
        );
        assert!(
            !gone.contains("card err") && !gone.contains("Попробовать снова"),
            "not a failed install: {gone}"
        );
    }
    let english = page(&app, &altered, "en").await.3;
    assert!(
        english.contains("This result is no longer available"),
        "{english}"
    );
    assert_eq!(tally(&app).await, before, "nothing audited or counted");
    app.stop().await;
}

on_all_backends!(
    a_connected_callback_ends_on_a_result_page_that_survives_reloads,
    a_failed_callback_ends_on_a_result_page_with_the_same_precise_error,
    an_expired_or_altered_result_address_says_the_result_is_gone,
);
