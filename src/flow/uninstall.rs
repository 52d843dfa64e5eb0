//! The uninstall webhook: amoCRM's signed notice that an admin disabled the integration.
//! The signature covers only "{client_id}|{account_id}" (no time), so a logged webhook URL
//! can be replayed; amoCRM is asked whether the stored token is really refused before
//! anything is wiped.

use super::{Flow, Requester};
use crate::amocrm::{AmoClient, AmoError, Platform};
use crate::crypto::TokenColumn;
use crate::crypto::{constant_time_eq, hmac_sha256_hex};
use crate::events::{ConnectionData, EventType};
use crate::keys;
use crate::log_safe::log_safe;
use crate::store::{
    Attempt, AttemptKind, ConnectionRow, ConnectionStatus, Disconnect, Outcome, Records,
    StoreError, now,
};

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("invalid webhook request: {0}")]
    InvalidRequest(String),
    #[error("client_uuid is not this integration's client id")]
    WrongClient,
    #[error("the signature does not match")]
    BadSignature,
    /// amoCRM could not be asked (or gave no clear answer); nothing was wiped, and a 503
    /// lets amoCRM send the webhook again.
    #[error("cannot confirm the uninstall with amoCRM: {0}")]
    Unconfirmed(AmoError),
    /// The stored access token has expired, so amoCRM refusing it would prove nothing.
    #[error("cannot confirm the uninstall: the stored access token has expired")]
    Unconfirmable,
    #[error("the stored access token cannot be decrypted: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl UninstallError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) => "invalid_request",
            Self::WrongClient => "wrong_client",
            Self::BadSignature => "bad_signature",
            Self::Unconfirmed(err) => err.reason(),
            Self::Unconfirmable => "unconfirmable",
            Self::Corrupt(_) => "corrupt_tokens",
            Self::Store(_) => "database_error",
        }
    }
}

/// What a valid webhook did; each answers 200.
#[derive(Debug, PartialEq, Eq)]
pub enum Uninstalled {
    /// amoCRM refused the stored token: the tokens are wiped.
    Disconnected,
    /// Unknown account, or already disconnected: nothing changed.
    NothingToDo,
    /// amoCRM still accepts the stored token (a replayed webhook, e.g. after a reconnect):
    /// nothing changed.
    Stale,
}

struct WebhookParams {
    client_uuid: String,
    account_id: i64,
    signature: String,
}

/// The signature amoCRM sends: lowercase hex HMAC-SHA256 keyed with the client secret over
/// "{client_id}|{account_id}".
fn expected_signature(client_id: &str, client_secret: &str, account_id: i64) -> String {
    hmac_sha256_hex(client_secret, &format!("{client_id}|{account_id}"))
}

fn parse(query: &str) -> Result<WebhookParams, UninstallError> {
    let (mut client_uuid, mut account_id, mut signature) = (None, None, None);
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        let slot = match name.as_ref() {
            "client_uuid" => &mut client_uuid,
            "account_id" => &mut account_id,
            "signature" => &mut signature,
            _ => continue,
        };
        if slot.is_some() {
            return Err(UninstallError::InvalidRequest(format!(
                "`{name}` appears more than once"
            )));
        }
        if value.len() > 128 {
            return Err(UninstallError::InvalidRequest(format!(
                "`{name}` is too long"
            )));
        }
        *slot = Some(value.into_owned());
    }
    let missing = |name: &str| UninstallError::InvalidRequest(format!("`{name}` is required"));
    let account_id = account_id.ok_or_else(|| missing("account_id"))?;
    Ok(WebhookParams {
        client_uuid: client_uuid.ok_or_else(|| missing("client_uuid"))?,
        account_id: account_id
            .parse::<i64>()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| {
                UninstallError::InvalidRequest("`account_id` must be a positive integer".into())
            })?,
        signature: signature.ok_or_else(|| missing("signature"))?,
    })
}

impl Flow {
    /// Checks the signature (HMAC-SHA256 keyed with the client secret over
    /// "{client_id}|{account_id}"), then wipes the account's tokens. Idempotent.
    pub async fn uninstall(
        &self,
        query: &str,
        requester: &Requester,
    ) -> Result<Uninstalled, UninstallError> {
        let parsed = parse(query);
        let account_id = parsed.as_ref().ok().map(|p| p.account_id);
        let result = match parsed {
            Ok(params) => self.verified_uninstall(&params, requester).await,
            Err(err) => Err(err),
        };
        let (outcome, reason, detail) = match &result {
            Ok(Uninstalled::Disconnected) => (Outcome::Success, Some("disconnected"), None),
            Ok(Uninstalled::NothingToDo) => (Outcome::Success, Some("nothing_to_do"), None),
            Ok(Uninstalled::Stale) => (Outcome::Failure, Some("stale_webhook"), None),
            Err(err) => (Outcome::Failure, Some(err.reason()), Some(err.to_string())),
        };
        match &result {
            Ok(_) => tracing::info!(
                kind = AttemptKind::Webhook.as_str(),
                account_id,
                reason,
                ip = requester.ip.as_deref(),
                "uninstall webhook handled"
            ),
            Err(err) => {
                tracing::warn!(kind = AttemptKind::Webhook.as_str(), account_id, reason, error = %log_safe(&err.to_string()), ip = requester.ip.as_deref(), "uninstall webhook refused")
            }
        }
        let attempt = Attempt::new(AttemptKind::Webhook, outcome)
            .because(reason, detail.as_deref())
            .of_account(None, account_id)
            .from_client(requester.ip.as_deref(), requester.user_agent());
        // A disconnect wrote its audit row in its own transaction.
        if !matches!(result, Ok(Uninstalled::Disconnected))
            && let Err(err) = self.store.record_attempt(&attempt).await
        {
            tracing::error!(error = %err, "could not write the webhook audit row");
        }
        result
    }

    async fn verified_uninstall(
        &self,
        params: &WebhookParams,
        requester: &Requester,
    ) -> Result<Uninstalled, UninstallError> {
        // client_uuid names the integration, so the signature is checked with its own secret.
        let amo = self
            .integrations
            .clients()
            .iter()
            .find(|client| constant_time_eq(&params.client_uuid, &client.config().client_id))
            .ok_or(UninstallError::WrongClient)?;
        let config = amo.config();
        let expected = expected_signature(
            &config.client_id,
            config.client_secret.expose(),
            params.account_id,
        );
        if !constant_time_eq(&params.signature, &expected) {
            return Err(UninstallError::BadSignature);
        }
        let platform = config.platform;
        let row = match self
            .store
            .find_connection(&format!("{platform}:{}", params.account_id))
            .await?
        {
            Some(row) if row.status != ConnectionStatus::Disconnected => row,
            _ => return Ok(Uninstalled::NothingToDo),
        };
        if !self.amocrm_refuses_the_token(amo, &row).await? {
            return Ok(Uninstalled::Stale);
        }
        let attempt = Attempt::new(AttemptKind::Webhook, Outcome::Success)
            .because(Some("disconnected"), None)
            .of_account(None, Some(params.account_id))
            .from_client(requester.ip.as_deref(), requester.user_agent());
        let event = self.events.prepare(
            EventType::ConnectionDisconnected,
            ConnectionData::of(&row).because("uninstalled", None),
        );
        let records = Records {
            attempt: Some(&attempt),
            event: event.as_ref(),
            ..Records::default()
        };
        let how = Disconnect::Unchanged {
            version: row.version,
        };
        Ok(
            if self
                .store
                .disconnect(platform, params.account_id, how, now(), &records)
                .await?
            {
                Uninstalled::Disconnected
            } else {
                // Reconnected (or disconnected) while amoCRM was asked: the new pair stays.
                Uninstalled::NothingToDo
            },
        )
    }

    /// Whether amoCRM refuses the stored access token with 401, which is what it does once
    /// the integration is uninstalled. Any other answer, or none, confirms nothing.
    async fn amocrm_refuses_the_token(
        &self,
        amo: &AmoClient,
        row: &ConnectionRow,
    ) -> Result<bool, UninstallError> {
        if row.expires_at <= now() {
            return Err(UninstallError::Unconfirmable);
        }
        let access_token = keys::open_token(&self.cipher, row, TokenColumn::AccessToken)
            .map_err(|err| UninstallError::Corrupt(err.to_string()))?;
        match amo.account(&row.domain, &access_token).await {
            Ok(_) => Ok(false),
            Err(AmoError::Rejected { status: 401, .. } | AmoError::Http { status: 401 }) => {
                Ok(true)
            }
            Err(err) => Err(UninstallError::Unconfirmed(err)),
        }
    }

    /// The admin's disconnect from the dashboard: wipes the account's tokens, marks it
    /// `disconnected` and releases it from its `external_id`; the event is written in the
    /// same transaction. False when there was nothing to do.
    pub async fn disconnect(
        &self,
        platform: Platform,
        account_id: i64,
    ) -> Result<bool, StoreError> {
        // The row is read only for the event's subdomain and domain.
        let event = match self.events.is_enabled() {
            true => {
                let qualified = format!("{platform}:{account_id}");
                let data = match self.store.find_connection(&qualified).await? {
                    Some(row) => ConnectionData::of(&row),
                    None => ConnectionData::new(platform, Some(account_id), "", ""),
                };
                self.events.prepare(
                    EventType::ConnectionDisconnected,
                    data.because("disconnected_by_admin", None),
                )
            }
            false => None,
        };
        let records = Records {
            event: event.as_ref(),
            ..Records::default()
        };
        self.store
            .disconnect(platform, account_id, Disconnect::ByAdmin, now(), &records)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Only the exact signature for this client and account is accepted.
        #[test]
        fn only_the_right_signature_verifies(account_id in 1i64.., other in 1i64.., forged in "[0-9a-f]{64}") {
            let good = expected_signature("client", "secret", account_id);
            proptest::prop_assert!(constant_time_eq(&good, &expected_signature("client", "secret", account_id)));
            proptest::prop_assert!(!constant_time_eq(&forged, &good) || forged == good);
            if other != account_id {
                proptest::prop_assert!(!constant_time_eq(&expected_signature("client", "secret", other), &good));
            }
            proptest::prop_assert!(!constant_time_eq(&expected_signature("client", "other-secret", account_id), &good));
        }

        /// Any query is parsed or refused without panicking.
        #[test]
        fn any_webhook_query_is_parsed_or_refused(query in ".{0,300}") {
            let _ = parse(&query);
        }
    }

    #[test]
    fn a_known_signature_matches_amocrm_php() {
        // hash_hmac('sha256', 'client|31337001', 'secret'), as amoCRM's PHP check computes it.
        assert_eq!(
            expected_signature("client", "secret", 31_337_001),
            "3180ce1136885fb3a6c33d5bedd5cb2c96160c9fa95205423062534e70e34c37"
        );
    }
}
