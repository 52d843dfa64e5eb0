//! amoCRM's OAuth client on its own, against amoauth's sandbox: the consent URL, the user's
//! Allow, the code exchange, the account lookup and a refresh. Prints no secret.
//!
//! Set the integration in `AMOCRM_CLIENT_ID`, `AMOCRM_CLIENT_SECRET` and
//! `AMOCRM_REDIRECT_URI`, start a sandbox that knows it (`amoauth sandbox` listens on
//! 127.0.0.1:8081), and give the sandbox's origin as the argument or in `AMOAUTH_AMOCRM_URL`:
//!
//! ```text
//! cargo run --example oauth_client -- http://127.0.0.1:8081
//! ```

use std::env;
use std::error::Error;

use amoauth::Secret;
use amoauth::amocrm::{AmoClient, ClientConfig, ConsentMode, Grant};
use url::Url;

/// The account the user picks on the consent page: the first one of `SandboxConfig::demo`.
const DEFAULT_ACCOUNT_ID: &str = "31337001";

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let origin: Url = env::args()
        .nth(1)
        .or_else(|| env::var("AMOAUTH_AMOCRM_URL").ok())
        .ok_or("give the sandbox's origin as the argument or in AMOAUTH_AMOCRM_URL")?
        .parse()?;
    let config = ClientConfig::new(
        required("AMOCRM_CLIENT_ID")?,
        Secret::new(required("AMOCRM_CLIENT_SECRET")?),
        required("AMOCRM_REDIRECT_URI")?.parse()?,
    )
    .with_override_origin(origin.clone());
    let client = AmoClient::new(config);

    // 1. The consent page, with a state to recognise the callback by.
    let state = format!("example-{}", std::process::id());
    let consent = client.consent_url(&state, None, ConsentMode::PostMessage);
    println!("consent page: {consent}");

    // 2. The user clicks Allow; the callback brings `code`, `state` and `referer`.
    let account_id = env::var("SANDBOX_ACCOUNT_ID").unwrap_or_else(|_| DEFAULT_ACCOUNT_ID.into());
    let callback = click_allow(&origin, &consent, &account_id).await?;
    let param = |name: &str| {
        callback
            .query_pairs()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
            .ok_or(format!("the callback has no `{name}`"))
    };
    if param("state")? != state {
        return Err("the callback's state is not ours".into());
    }
    let code = Secret::new(param("code")?);
    let host = client
        .account_host(&param("referer")?)
        .ok_or("the referer is not an amoCRM account host")?;
    println!("callback from: {}", host.host);

    // 3. The code for a token pair, at the account's own host.
    let tokens = client.exchange_code(&host.host, code.expose()).await?;
    println!(
        "exchanged the code: the access token lives {} s",
        tokens.expires_in
    );

    // 4. Whose account it is.
    let account = client.account(&host.host, &tokens.access_token).await?;
    println!(
        "account: id {}, subdomain {}, name {}",
        account.id, account.subdomain, account.name
    );

    // 5. A refresh rotates both tokens; a real program stores the grant before using them.
    let mut grant = Grant {
        host: host.host,
        account_id: Some(account.id),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
    };
    let previous = grant.refresh_token.clone();
    let refreshed = client.refresh_grant(&mut grant).await?;
    println!(
        "refreshed at {}: new refresh token {}, the access token lives {} s",
        grant.host,
        if grant.refresh_token != previous {
            "yes"
        } else {
            "no"
        },
        refreshed.expires_in
    );
    let again = client.account(&grant.host, &grant.access_token).await?;
    println!("the new access token works: account id {}", again.id);
    Ok(())
}

fn required(name: &str) -> Result<String, String> {
    env::var(name).map_err(|_| format!("set {name}"))
}

/// What a user does in the browser: opens the consent page and clicks Allow for the account.
/// amoCRM's page is not scriptable; the sandbox's form is. Returns the callback URL.
async fn click_allow(origin: &Url, consent: &Url, account_id: &str) -> Result<Url, Box<dyn Error>> {
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let page = browser.get(consent.clone()).send().await?;
    if !page.status().is_success() {
        return Err(format!("the consent page answered {}", page.status()).into());
    }
    let mut form: Vec<(String, String)> = consent.query_pairs().into_owned().collect();
    form.push(("account_id".into(), account_id.into()));
    form.push(("decision".into(), "allow".into()));
    let decided = browser
        .post(origin.join("/oauth/decide")?)
        .form(&form)
        .send()
        .await?;
    let location = decided
        .headers()
        .get(reqwest::header::LOCATION)
        .ok_or(format!(
            "the consent page answered {} without a redirect",
            decided.status()
        ))?;
    Ok(Url::parse(location.to_str()?)?)
}
