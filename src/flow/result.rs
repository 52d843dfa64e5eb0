//! A finished callback's outcome, sealed into the address of its result page: a reload, Back
//! or a copied link shows the same page again and never runs the callback a second time.
//! Stateless, so every replica sharing the encryption key can show it, and nothing is stored.

use serde::{Deserialize, Serialize};

use super::{CallbackError, CallbackReason, Connected, Flow};
use crate::amocrm::AmoError;
use crate::store::now;

/// The AEAD context of result tokens: no other sealed value (a stored token) opens as one.
const CONTEXT: &str = "callback_result";
/// Characters kept of each text from amoCRM: the page shows at most 300 of them, and the
/// result address must stay far below what proxies accept in a URL.
const MAX_TEXT: usize = 300;

/// What a callback's result page shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Settled {
    Connected(Connected),
    Failed(Failure),
    /// The last page of a `post_message` connect link: `report` is posted to the window that
    /// opened it, at `return_url`'s origin only.
    PostMessage {
        return_url: String,
        report: Vec<(String, String)>,
    },
}

/// A callback failure as its page shows it: `CallbackError` without the database error's
/// cause, which is logged and audited but never shown, so it can be sealed and read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Failure {
    AccessDenied,
    AmoCrmReportedError(String),
    InvalidRequest(String),
    BadReferer,
    RefererMismatch { referer: String, expected: String },
    AccountTaken,
    UnknownState,
    UsedState,
    ExpiredState,
    WidgetInstallsOff,
    Exchange { host: String, source: AmoError },
    AccountLookup { host: String, source: AmoError },
    Database,
}

impl Failure {
    /// The stable reason of audit rows, metrics and connect-link reports.
    pub fn reason(&self) -> CallbackReason {
        match self {
            Self::AccessDenied => CallbackReason::AccessDenied,
            Self::AmoCrmReportedError(_) => CallbackReason::AmoCrmCallbackError,
            Self::InvalidRequest(_) => CallbackReason::InvalidRequest,
            Self::BadReferer => CallbackReason::BadReferer,
            Self::RefererMismatch { .. } => CallbackReason::RefererMismatch,
            Self::AccountTaken => CallbackReason::AccountTaken,
            Self::UnknownState => CallbackReason::UnknownState,
            Self::UsedState => CallbackReason::UsedState,
            Self::ExpiredState => CallbackReason::ExpiredState,
            Self::WidgetInstallsOff => CallbackReason::WidgetInstallsOff,
            Self::Exchange { source, .. } | Self::AccountLookup { source, .. } => {
                source.failure().into()
            }
            Self::Database => CallbackReason::DatabaseError,
        }
    }
}

impl From<&CallbackError> for Failure {
    fn from(err: &CallbackError) -> Self {
        match err {
            CallbackError::AccessDenied => Self::AccessDenied,
            CallbackError::AmoCrmReportedError(code) => Self::AmoCrmReportedError(code.clone()),
            CallbackError::InvalidRequest(why) => Self::InvalidRequest(why.clone()),
            CallbackError::BadReferer => Self::BadReferer,
            CallbackError::RefererMismatch { referer, expected } => Self::RefererMismatch {
                referer: referer.clone(),
                expected: expected.clone(),
            },
            CallbackError::AccountTaken => Self::AccountTaken,
            CallbackError::UnknownState => Self::UnknownState,
            CallbackError::UsedState => Self::UsedState,
            CallbackError::ExpiredState => Self::ExpiredState,
            CallbackError::WidgetInstallsOff => Self::WidgetInstallsOff,
            CallbackError::Exchange { host, source } => Self::Exchange {
                host: host.clone(),
                source: bounded(source),
            },
            CallbackError::AccountLookup { host, source } => Self::AccountLookup {
                host: host.clone(),
                source: bounded(source),
            },
            CallbackError::Store(_) => Self::Database,
        }
    }
}

/// amoCRM's error with every text it chose cut to `MAX_TEXT` characters.
fn bounded(err: &AmoError) -> AmoError {
    let cut = |text: &String| text.chars().take(MAX_TEXT).collect::<String>();
    match err {
        AmoError::Rejected { status, problem } => {
            let mut problem = problem.clone();
            for text in [
                &mut problem.title,
                &mut problem.problem_type,
                &mut problem.detail,
                &mut problem.hint,
            ]
            .into_iter()
            .flatten()
            {
                *text = cut(text);
            }
            AmoError::Rejected {
                status: *status,
                problem,
            }
        }
        AmoError::Unreachable { host, reason } => AmoError::Unreachable {
            host: host.clone(),
            reason: cut(reason),
        },
        AmoError::BadResponse(what) => AmoError::BadResponse(cut(what)),
        other => other.clone(),
    }
}

/// A result token's sealed content.
#[derive(Serialize, Deserialize)]
struct Sealed {
    /// Unix time in milliseconds after which the page is no longer shown.
    expires_at: i64,
    settled: Settled,
}

impl Flow {
    /// Seals `settled` into a token for its result address, readable for one state TTL.
    pub fn seal_result(&self, settled: Settled) -> String {
        let lifetime = i64::try_from(self.state_ttl.as_millis()).unwrap_or(i64::MAX);
        let sealed = Sealed {
            expires_at: now_millis().saturating_add(lifetime),
            settled,
        };
        let json = serde_json::to_string(&sealed).expect("plain data serializes");
        self.cipher.seal_for_url(&json, CONTEXT)
    }

    /// What a result token shows; None when it is expired, altered or sealed with a key
    /// this server does not have.
    pub fn open_result(&self, token: &str) -> Option<Settled> {
        let json = self.cipher.open_from_url(token, CONTEXT).ok()?;
        let sealed: Sealed = serde_json::from_str(json.expose()).ok()?;
        (now_millis() < sealed.expires_at).then_some(sealed.settled)
    }
}

fn now_millis() -> i64 {
    now().and_utc().timestamp_millis()
}
