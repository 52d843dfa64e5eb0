//! The sandbox's amoCRM API over real sockets: leads and contacts with pagination, create and
//! update, the Bearer token, 7 requests a second per account, the IP block and injected faults.

use std::time::{Duration, Instant};

use amoauth::sandbox::{ApiFault, ApiLimits, Fault, Sandbox, SandboxConfig};
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};

use crate::support::*;

/// The demo's Kommo account, beside `ACCOUNT_ID`.
const OTHER_ACCOUNT_ID: i64 = 31_337_002;
/// High enough that the tests of records never meet the rate limit.
const UNLIMITED: usize = 1_000_000;

struct ApiSandbox {
    sandbox: Sandbox,
    origin: String,
    client: reqwest::Client,
}

impl ApiSandbox {
    async fn spawn(limits: ApiLimits) -> Self {
        let mut config = SandboxConfig::demo(CLIENT_ID, CLIENT_SECRET, "http://127.0.0.1:1/cb");
        config.api = limits;
        let sandbox = Sandbox::new(config);
        let addr = sandbox.spawn("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Self {
            sandbox,
            origin: format!("http://localhost:{}", addr.port()),
            client: http_client(),
        }
    }

    async fn unlimited() -> Self {
        Self::spawn(ApiLimits {
            requests_per_second: UNLIMITED,
            ..ApiLimits::default()
        })
        .await
    }

    /// An access token for the account, through the token endpoint as a client gets one.
    async fn token(&self, account_id: i64) -> String {
        let code = self.sandbox.authorize(account_id);
        let response = self
            .client
            .post(format!("{}/oauth2/access_token", self.origin))
            .json(&json!({
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": "http://127.0.0.1:1/cb",
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let grant: Value = response.json().await.unwrap();
        grant["access_token"].as_str().unwrap().to_owned()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.origin))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        // An injected `Fault::ServerError` answers plain text.
        let body = match text.is_empty() {
            true => Value::Null,
            false => serde_json::from_str(&text).unwrap_or(Value::String(text)),
        };
        (status, body)
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }
}

fn names(page: &Value, kind: &str) -> Vec<String> {
    page["_embedded"][kind]
        .as_array()
        .unwrap()
        .iter()
        .map(|record| record["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn leads_are_created_listed_by_page_and_updated() {
    let api = ApiSandbox::unlimited().await;
    let token = api.token(ACCOUNT_ID).await;
    let new_leads: Vec<Value> = (1..=5)
        .map(|n| json!({ "name": format!("Lead {n}"), "price": n * 100 }))
        .collect();
    let mut new_leads = new_leads;
    new_leads[0]["request_id"] = json!("first");
    let (status, created) = api
        .call(
            reqwest::Method::POST,
            "/api/v4/leads",
            &token,
            Some(Value::Array(new_leads)),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    let created = created["_embedded"]["leads"].as_array().unwrap().clone();
    let request_ids: Vec<&str> = created
        .iter()
        .map(|c| c["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(request_ids, ["first", "1", "2", "3", "4"]);
    let ids: Vec<i64> = created.iter().map(|c| c["id"].as_i64().unwrap()).collect();

    let (status, page) = api.get("/api/v4/leads?page=1&limit=2", &token).await;
    assert_eq!(status, 200);
    assert_eq!(page["_page"], 1);
    assert_eq!(names(&page, "leads"), ["Lead 1", "Lead 2"]);
    assert_eq!(
        page["_links"]["next"]["href"],
        "https://demo.amocrm.ru/api/v4/leads?page=2&limit=2"
    );
    let (status, last) = api.get("/api/v4/leads?page=3&limit=2", &token).await;
    assert_eq!(status, 200);
    assert_eq!(names(&last, "leads"), ["Lead 5"]);
    assert!(last["_links"].get("next").is_none(), "{last}");
    assert_eq!(last["_embedded"]["leads"][0]["price"], 500);
    assert_eq!(last["_embedded"]["leads"][0]["account_id"], ACCOUNT_ID);
    let (status, past_the_end) = api.get("/api/v4/leads?page=4&limit=2", &token).await;
    assert_eq!((status, past_the_end), (204, Value::Null));

    let (status, updated) = api
        .call(
            reqwest::Method::PATCH,
            "/api/v4/leads",
            &token,
            Some(json!([{ "id": ids[0], "name": "Renamed" }, { "id": ids[1], "price": 7 }])),
        )
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["_embedded"]["leads"][1]["id"], ids[1]);
    let (status, one) = api
        .call(
            reqwest::Method::PATCH,
            &format!("/api/v4/leads/{}", ids[2]),
            &token,
            Some(json!({ "name": "Patched alone" })),
        )
        .await;
    assert_eq!((status, one["id"].as_i64()), (200, Some(ids[2])));
    let (_, page) = api.get("/api/v4/leads?limit=3", &token).await;
    assert_eq!(
        names(&page, "leads"),
        ["Renamed", "Lead 2", "Patched alone"]
    );
    assert_eq!(page["_embedded"]["leads"][1]["price"], 7);
    let (status, lead) = api.get(&format!("/api/v4/leads/{}", ids[0]), &token).await;
    assert_eq!((status, lead["name"].as_str()), (200, Some("Renamed")));

    // An unknown id anywhere in a batch changes nothing.
    let (status, refused) = api
        .call(
            reqwest::Method::PATCH,
            "/api/v4/leads",
            &token,
            Some(json!([{ "id": ids[3], "name": "Not applied" }, { "id": 1, "name": "x" }])),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(refused["validation-errors"][0]["request_id"], "1");
    let (_, lead) = api.get(&format!("/api/v4/leads/{}", ids[3]), &token).await;
    assert_eq!(lead["name"], "Lead 4");
    let (status, _) = api.get("/api/v4/leads/1", &token).await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn contacts_and_other_accounts_keep_their_own_records() {
    let api = ApiSandbox::unlimited().await;
    let token = api.token(ACCOUNT_ID).await;
    let other_token = api.token(OTHER_ACCOUNT_ID).await;
    let (status, _) = api
        .call(
            reqwest::Method::POST,
            "/api/v4/contacts",
            &token,
            Some(json!([{ "name": "Ivan" }])),
        )
        .await;
    assert_eq!(status, 200);
    let (status, contacts) = api.get("/api/v4/contacts", &token).await;
    assert_eq!(status, 200);
    assert_eq!(names(&contacts, "contacts"), ["Ivan"]);
    let (status, _) = api.get("/api/v4/leads", &token).await;
    assert_eq!(status, 204, "contacts are not leads");
    let (status, _) = api.get("/api/v4/contacts", &other_token).await;
    assert_eq!(status, 204, "another account sees none of them");

    // At another account's host the token finds no account, as on amoCRM.
    let response = api
        .client
        .get(format!("{}/api/v4/contacts", api.origin))
        .header("host", "kommodemo.kommo.com")
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let (status, _) = api.get("/api/v4/tasks", &token).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn stale_unknown_and_expired_tokens_get_401_problem_json() {
    let api = ApiSandbox::unlimited().await;
    let revoked = api.token(ACCOUNT_ID).await;
    api.sandbox.revoke_tokens(ACCOUNT_ID);
    let expiring = api.token(OTHER_ACCOUNT_ID).await;
    let (status, _) = api.get("/api/v4/leads", &expiring).await;
    assert_eq!(status, 204, "valid before the clock moves");
    api.sandbox.advance_clock(Duration::from_secs(86_400));

    for token in [revoked.as_str(), "not-a-token", expiring.as_str()] {
        let response = api
            .client
            .get(format!("{}/api/v4/leads", api.origin))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], 401);
        assert_eq!(body["title"], "Unauthorized");
    }
    assert_eq!(api.sandbox.api_stats().unauthorized, 3);
}

#[tokio::test]
async fn the_eighth_request_in_a_second_gets_429_and_other_accounts_go_on() {
    let api = ApiSandbox::spawn(ApiLimits::default()).await;
    let token = api.token(ACCOUNT_ID).await;
    let other_token = api.token(OTHER_ACCOUNT_ID).await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = api
            .client
            .get(format!("{}/api/v4/leads", api.origin))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert_eq!(response.headers()[RETRY_AFTER], "1");
        }
        statuses.push(response.status().as_u16());
    }
    // Eight sequential loopback requests take milliseconds; the count below needs them
    // all within one second.
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(statuses, [204, 204, 204, 204, 204, 204, 204, 429]);
    let (status, _) = api.get("/api/v4/leads", &other_token).await;
    assert_eq!(status, 204, "the limit is per account");

    let stats = api.sandbox.api_stats();
    let account = stats.account(ACCOUNT_ID);
    assert_eq!(account.requests, 8);
    assert_eq!(account.too_many_requests, 1);
    assert_eq!(account.max_per_second, 8);
    assert_eq!(stats.account(OTHER_ACCOUNT_ID).too_many_requests, 0);
    assert_eq!(stats.account(OTHER_ACCOUNT_ID).max_per_second, 1);
    assert_eq!(stats.too_many_requests(), 1);
}

#[tokio::test]
async fn repeated_429s_block_the_ip_for_every_account_until_lifted() {
    let api = ApiSandbox::spawn(ApiLimits {
        requests_per_second: 1,
        block_after_429s: 3,
        ..ApiLimits::default()
    })
    .await;
    let token = api.token(ACCOUNT_ID).await;
    let other_token = api.token(OTHER_ACCOUNT_ID).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(api.get("/api/v4/leads", &token).await.0);
    }
    // One allowed, three 429s tolerated, the fourth starts the block.
    assert_eq!(statuses, [204, 429, 429, 429, 429]);
    let (status, body) = api.get("/api/v4/leads", &token).await;
    assert_eq!((status, body["status"].as_u64()), (403, Some(403)));
    let (status, _) = api.get("/api/v4/contacts", &other_token).await;
    assert_eq!(status, 403, "the block is for every account");
    let (status, _) = api.get("/api/v4/contacts", "not-a-token").await;
    assert_eq!(status, 403, "and for any request");

    let stats = api.sandbox.api_stats();
    assert_eq!(stats.account(ACCOUNT_ID).too_many_requests, 4);
    assert_eq!(stats.account(ACCOUNT_ID).forbidden, 1);
    assert_eq!(stats.account(OTHER_ACCOUNT_ID).forbidden, 1);
    assert_eq!(stats.forbidden(), 3);

    api.sandbox.lift_ip_blocks();
    let (status, _) = api.get("/api/v4/contacts", &other_token).await;
    assert_eq!(status, 204);
}

#[tokio::test]
async fn injected_server_errors_and_latency_hit_the_api_then_clear() {
    let api = ApiSandbox::unlimited().await;
    let token = api.token(ACCOUNT_ID).await;
    let other_token = api.token(OTHER_ACCOUNT_ID).await;
    api.sandbox.set_api_fault(Some(
        ApiFault::times(Fault::ServerError, 2).for_account(ACCOUNT_ID),
    ));
    let (status, _) = api.get("/api/v4/leads", &other_token).await;
    assert_eq!(status, 204, "another account's requests are not hit");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(api.get("/api/v4/leads", &token).await.0);
    }
    assert_eq!(statuses, [500, 500, 204]);
    assert_eq!(api.sandbox.api_stats().account(ACCOUNT_ID).requests, 3);

    let delay = Duration::from_millis(400);
    api.sandbox
        .set_api_fault(Some(ApiFault::always(Fault::Delay(delay))));
    let started = Instant::now();
    let (status, _) = api.get("/api/v4/contacts", &token).await;
    assert_eq!(status, 204);
    assert!(started.elapsed() >= delay);
    api.sandbox.set_api_fault(None);
    let started = Instant::now();
    api.get("/api/v4/contacts", &token).await;
    assert!(started.elapsed() < delay);
}
