//! `GET /amocrm/webhook/uninstall`: amoCRM tells us an admin disabled the integration.

use axum::Extension;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::client::ClientIp;
use super::oauth::requester;
use crate::flow::{UninstallError, Uninstalled};

pub async fn uninstall(
    State(state): State<AppState>,
    Extension(ClientIp(peer)): Extension<ClientIp>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let requester = requester(peer, &headers);
    match state
        .flow
        .uninstall(query.as_deref().unwrap_or_default(), &requester)
        .await
    {
        Ok(Uninstalled::Disconnected) => (StatusCode::OK, "disconnected\n").into_response(),
        Ok(Uninstalled::NothingToDo) => (StatusCode::OK, "nothing to do\n").into_response(),
        Ok(Uninstalled::Stale) => (
            StatusCode::OK,
            "stale: amoCRM still accepts this account's token; nothing changed\n",
        )
            .into_response(),
        Err(err) => {
            let status = match err {
                UninstallError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
                UninstallError::WrongClient => StatusCode::FORBIDDEN,
                UninstallError::BadSignature => StatusCode::UNAUTHORIZED,
                UninstallError::Unconfirmed(_)
                | UninstallError::Unconfirmable
                | UninstallError::Corrupt(_)
                | UninstallError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            (status, format!("{err}\n")).into_response()
        }
    }
}
