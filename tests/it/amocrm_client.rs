//! The public amoCRM client on its own (no server, no database) against the sandbox over real
//! sockets: the grace rule of rotation, rename rediscovery, typed problem+json errors and the
//! host allow-list.

use std::time::Duration;

use amoauth::Secret;
use amoauth::amocrm::{AmoClient, AmoError, ClientConfig, Grant, ProblemKind};
use amoauth::sandbox::{Fault, Sandbox};

use crate::support::{ACCOUNT_ID, CLIENT_ID, CLIENT_SECRET, spawn_sandbox};

const REDIRECT_URI: &str = "https://app.example/amocrm/callback";
const HOST: &str = "demo.amocrm.ru";

/// A sandbox and a client for its integration with `secret` and a 1 s timeout.
async fn client_and_sandbox(secret: &str) -> (AmoClient, Sandbox) {
    let (sandbox, origin) = spawn_sandbox(REDIRECT_URI).await;
    let config = ClientConfig::new(
        CLIENT_ID,
        Secret::new(secret),
        REDIRECT_URI.parse().unwrap(),
    )
    .with_override_origin(origin.parse().unwrap())
    .with_timeout(Duration::from_secs(1));
    (AmoClient::new(config), sandbox)
}

async fn connected_grant(client: &AmoClient, sandbox: &Sandbox) -> Grant {
    let tokens = client
        .exchange_code(HOST, &sandbox.authorize(ACCOUNT_ID))
        .await
        .unwrap();
    Grant {
        host: HOST.into(),
        account_id: Some(ACCOUNT_ID),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
    }
}

#[tokio::test]
async fn a_lost_refresh_reply_is_retried_with_the_old_token_which_dies_once_its_successor_is_used()
{
    let (client, sandbox) = client_and_sandbox(CLIENT_SECRET).await;
    let mut grant = connected_grant(&client, &sandbox).await;
    let first = grant.refresh_token.clone();

    // amoCRM rotates the token but the reply is lost: the grant keeps the old pair.
    sandbox.set_token_fault(Some(Fault::LoseReply));
    let err = client.refresh_grant(&mut grant).await.unwrap_err();
    assert!(matches!(err, AmoError::Timeout(_)), "{err:?}");
    assert!(!err.revokes_grant());
    assert_eq!(
        grant.refresh_token, first,
        "a failed refresh changes nothing"
    );

    // The grace rule: the old token is still accepted.
    sandbox.set_token_fault(None);
    client.refresh_grant(&mut grant).await.unwrap();
    assert_ne!(grant.refresh_token, first);
    assert_eq!(sandbox.stats().successful_refreshes, 2);

    // Its successor's first use revokes it for good.
    client.refresh_grant(&mut grant).await.unwrap();
    let err = client.refresh(HOST, &first).await.unwrap_err();
    assert!(err.revokes_grant(), "{err:?}");
    assert_eq!(err.problem_kind(), Some(ProblemKind::TokenRevoked));
}

#[tokio::test]
async fn a_renamed_account_is_refreshed_at_its_new_host_and_only_for_the_same_account() {
    let (client, sandbox) = client_and_sandbox(CLIENT_SECRET).await;
    let mut grant = connected_grant(&client, &sandbox).await;
    sandbox.rename_account(ACCOUNT_ID, "renamed");

    // A grant claiming another account does not believe the lookup's answer.
    let mut foreign = grant.clone();
    foreign.account_id = Some(ACCOUNT_ID + 1);
    let err = client.refresh_grant(&mut foreign).await.unwrap_err();
    assert!(
        matches!(err, AmoError::Rejected { status: 404, .. }),
        "{err:?}"
    );
    assert_eq!(foreign.host, HOST);
    assert_eq!(foreign.refresh_token, grant.refresh_token);

    // The lookup alone, as after an API call's 404.
    let moved = client.moved_host(&grant).await.expect("a new host");
    assert_eq!(
        (moved.host.as_str(), moved.subdomain.as_str()),
        ("renamed.amocrm.ru", "renamed")
    );

    let refreshed = client.refresh_grant(&mut grant).await.unwrap();
    assert_eq!(refreshed.moved_from.as_deref(), Some(HOST));
    assert_eq!(grant.host, "renamed.amocrm.ru");
    assert!(
        client.moved_host(&grant).await.is_none(),
        "it is where it is"
    );
    let stats = sandbox.stats();
    assert_eq!(stats.subdomain_lookups, 4);
    assert_eq!(
        stats.token_hosts,
        [HOST, HOST, HOST, "renamed.amocrm.ru"],
        "exchange, the foreign grant's refresh, then this grant's refresh and its retry"
    );
    let account = client
        .account(&grant.host, &grant.access_token)
        .await
        .unwrap();
    assert_eq!(
        (account.id, account.subdomain.as_str()),
        (ACCOUNT_ID, "renamed")
    );
}

#[tokio::test]
async fn amocrm_errors_arrive_typed_with_their_problem_json_and_no_secret() {
    let (wrong_secret, sandbox) = client_and_sandbox("not-the-secret").await;
    let code = sandbox.authorize(ACCOUNT_ID);
    let err = wrong_secret.exchange_code(HOST, &code).await.unwrap_err();
    let problem = err.problem().expect("problem+json");
    assert_eq!(problem.kind(), ProblemKind::InvalidClient);
    assert_eq!(problem.status, Some(401));
    assert_eq!(problem.title.as_deref(), Some("Некорректный клиент"));
    assert_eq!(
        problem.detail.as_deref(),
        Some("Авторизация клиента не прошла")
    );
    assert_eq!(
        problem.problem_type.as_deref(),
        Some("https://developers.amocrm.ru/v3/errors/OAuthProblemJson")
    );
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(
            !shown.contains(&code) && !shown.contains("not-the-secret"),
            "{shown}"
        );
    }

    let (client, sandbox) = client_and_sandbox(CLIENT_SECRET).await;
    let code = sandbox.authorize(ACCOUNT_ID);
    client.exchange_code(HOST, &code).await.unwrap();
    let err = client.exchange_code(HOST, &code).await.unwrap_err();
    assert!(
        matches!(err, AmoError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(err.problem_kind(), Some(ProblemKind::CodeRevoked));
    assert_eq!(
        err.problem().unwrap().hint.as_deref(),
        Some("Authorization code has been revoked")
    );

    sandbox.set_token_fault(Some(Fault::ServerError));
    let err = client
        .exchange_code(HOST, &sandbox.authorize(ACCOUNT_ID))
        .await
        .unwrap_err();
    assert!(matches!(err, AmoError::Http { status: 500 }), "{err:?}");
    sandbox.set_token_fault(Some(Fault::Garbage));
    let err = client
        .exchange_code(HOST, &sandbox.authorize(ACCOUNT_ID))
        .await
        .unwrap_err();
    assert!(matches!(err, AmoError::BadResponse(_)), "{err:?}");
}

#[tokio::test]
async fn hosts_outside_the_allow_list_get_no_request() {
    let (client, sandbox) = client_and_sandbox(CLIENT_SECRET).await;
    let code = sandbox.authorize(ACCOUNT_ID);
    for host in [
        "evil.example.com",
        "www.amocrm.ru",
        "demo.amocrm.ru.evil.com",
        "x@demo.amocrm.ru",
    ] {
        let err = client.exchange_code(host, &code).await.unwrap_err();
        assert!(
            matches!(err, AmoError::HostNotAllowed { .. }),
            "{host}: {err:?}"
        );
        let err = client.account(host, &Secret::new("t")).await.unwrap_err();
        assert!(
            matches!(err, AmoError::HostNotAllowed { .. }),
            "{host}: {err:?}"
        );
    }
    assert_eq!(sandbox.stats().requests, 0);
    // The code was never spent.
    client.exchange_code(HOST, &code).await.unwrap();
}
