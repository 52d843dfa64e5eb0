//! A host web app that embeds amoauth: its own routes beside amoauth's, mounted under
//! `/amocrm-auth` (the install and callback stay at `/amocrm/…`), and a route of its own that
//! reads an account's access token in-process.
//!
//! Run it against the sandbox (`amoauth sandbox` in another terminal):
//!
//! ```text
//! EMBED_LISTEN=127.0.0.1:8080 AMOCRM_CLIENT_ID=demo AMOCRM_CLIENT_SECRET=demo-secret \
//! AMOCRM_REDIRECT_URI=http://127.0.0.1:8080/amocrm/callback \
//! AMOAUTH_AMOCRM_URL=http://localhost:8081 AMOAUTH_ADMIN_TOKEN=change-me-to-something-long \
//! cargo run --example embed
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;

/// A setting from the environment, or `default`.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listen: SocketAddr = env_or("EMBED_LISTEN", "127.0.0.1:8080").parse()?;
    let mut builder = amoauth::Amoauth::builder()
        .database_url(env_or("DATABASE_URL", "sqlite://embed.db"))
        .amocrm(
            env_or("AMOCRM_CLIENT_ID", "demo"),
            env_or("AMOCRM_CLIENT_SECRET", "demo-secret"),
            env_or(
                "AMOCRM_REDIRECT_URI",
                &format!("http://{listen}/amocrm/callback"),
            ),
        )
        .admin_token(env_or("AMOAUTH_ADMIN_TOKEN", "change-me-to-something-long"))
        .base_path("/amocrm-auth");
    if let Ok(sandbox) = std::env::var("AMOAUTH_AMOCRM_URL") {
        builder = builder.amocrm_url(sandbox);
    }
    let amoauth = Arc::new(builder.build().await?);

    let app = axum::Router::new()
        .route("/", get(|| async { "the host app's own page\n" }))
        .route("/crm/{account}", get(account_token))
        .with_state(Arc::clone(&amoauth))
        .merge(amoauth.router());
    // The refresh worker, cleanup and event delivery run beside the app until it stops.
    let background = amoauth.spawn_background();
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(
        listener,
        // amoauth's rate limits and audit trail need each client's address.
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    background.stop().await;
    Ok(())
}

/// What the host app knows about an account's token; a real app would call amoCRM with it.
async fn account_token(
    State(amoauth): State<Arc<amoauth::Amoauth>>,
    Path(account): Path<String>,
) -> Result<Json<serde_json::Value>, (StatusCode, String)> {
    let token = amoauth
        .access_token(&account)
        .await
        .map_err(|err| (StatusCode::SERVICE_UNAVAILABLE, err.to_string()))?;
    Ok(Json(serde_json::json!({
        "account_id": token.account_id,
        "domain": token.domain,
        "expires_at": token.expires_at.and_utc().to_rfc3339(),
        // Never the token itself in a page: its length shows one was read.
        "token_length": token.token.expose().len(),
    })))
}
