//! amoCRM's errors: problem+json bodies with a `hint`, and the typed error of every call.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An amoCRM problem+json body (RFC 7807's `title`, `type`, `status`, `detail`, plus amoCRM's
/// `hint`), e.g. a reused refresh token:
///
/// ```
/// use amoauth::amocrm::{Problem, ProblemKind};
///
/// let body = r#"{"hint":"Token has been revoked","title":"Некорректный запрос",
///   "type":"https://developers.amocrm.ru/v3/errors/OAuthProblemJson","status":401,
///   "detail":"В запросе отсутствует ряд параметров или параметры невалидны"}"#;
/// let problem = Problem::parse(body.as_bytes()).unwrap();
/// assert_eq!(problem.status, Some(401));
/// assert_eq!(problem.kind(), ProblemKind::TokenRevoked);
/// ```
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// A short summary, often Russian (`Некорректный запрос`, `Некорректный клиент`).
    #[serde(default)]
    pub title: Option<String>,
    /// The problem type URI, e.g. `https://developers.amocrm.ru/v3/errors/OAuthProblemJson`.
    #[serde(default, rename = "type")]
    pub problem_type: Option<String>,
    /// The HTTP status amoCRM put in the body.
    #[serde(default)]
    pub status: Option<u16>,
    /// A longer explanation.
    #[serde(default)]
    pub detail: Option<String>,
    /// What exactly went wrong, in English (`Token has been revoked`): what [`kind`](Self::kind)
    /// classifies by.
    #[serde(default)]
    pub hint: Option<String>,
}

/// What a [`Problem`] means, classified on its hint and title as amoCRM words them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// The code was already exchanged (codes are single use).
    CodeRevoked,
    /// The code is older than its 20 minutes.
    CodeExpired,
    /// Not a code amoCRM issued (or issued for another client).
    CodeInvalid,
    /// A refresh token that was superseded (its successor was used) or revoked (the
    /// integration was disabled in the account).
    TokenRevoked,
    /// A refresh token older than its 3 months.
    TokenExpired,
    /// Wrong client id or secret key.
    InvalidClient,
    /// The `redirect_uri` differs from the integration's registered one.
    RedirectUriMismatch,
    /// Anything else.
    Other,
}

impl Problem {
    /// Parses a body as problem+json when it looks like one (a JSON object with a `title`,
    /// `hint` or `detail`).
    pub fn parse(body: &[u8]) -> Option<Self> {
        let problem: Self = serde_json::from_slice(body).ok()?;
        (problem.title.is_some() || problem.hint.is_some() || problem.detail.is_some())
            .then_some(problem)
    }

    /// What the problem means, from its `hint` (and `title` for a wrong client).
    pub fn kind(&self) -> ProblemKind {
        let hint = self
            .hint
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let title = self.title.as_deref().unwrap_or_default();
        if hint.contains("authorization code has been revoked") {
            ProblemKind::CodeRevoked
        } else if hint.contains("authorization code has expired") {
            ProblemKind::CodeExpired
        } else if hint.contains("authorization code") {
            ProblemKind::CodeInvalid
        } else if hint.contains("token has been revoked") {
            ProblemKind::TokenRevoked
        } else if hint.contains("token has expired") {
            ProblemKind::TokenExpired
        } else if hint.contains("refresh token") {
            ProblemKind::TokenRevoked
        } else if hint.contains("redirect") {
            ProblemKind::RedirectUriMismatch
        } else if title == "Некорректный клиент" || title.eq_ignore_ascii_case("invalid client")
        {
            ProblemKind::InvalidClient
        } else {
            ProblemKind::Other
        }
    }

    /// A one-line summary of at most 300 characters, safe for logs and pages: amoCRM's
    /// words (`hint — title — detail`), never a secret.
    pub fn summary(&self) -> String {
        let mut parts: Vec<&str> = Vec::new();
        for part in [&self.hint, &self.title, &self.detail]
            .into_iter()
            .flatten()
        {
            if !part.is_empty() {
                parts.push(part);
            }
        }
        let text = if parts.is_empty() {
            "no details".to_owned()
        } else {
            parts.join(" — ")
        };
        text.chars().take(300).collect()
    }
}

/// Why a call to amoCRM failed. Plain data (it serializes), and neither its `Display` nor its
/// `Debug` holds a code, a token or the secret key.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AmoError {
    /// amoCRM answered an error status with a problem+json body.
    #[error("amoCRM rejected the request with HTTP {status}: {}", problem.summary())]
    Rejected {
        /// The HTTP status of the answer.
        status: u16,
        /// The body.
        problem: Problem,
    },
    /// amoCRM answered an error status with some other body (an HTML page, nothing).
    #[error("amoCRM answered HTTP {status} with a body that is not problem+json")]
    Http {
        /// The HTTP status of the answer.
        status: u16,
    },
    /// amoCRM answered with a redirect, which the client never follows (it would carry the
    /// secret key or a token elsewhere).
    #[error("amoCRM answered with a redirect (HTTP {status}); redirects are never followed")]
    Redirect {
        /// The HTTP status of the answer.
        status: u16,
    },
    /// No answer within [`ClientConfig::timeout`](super::ClientConfig::timeout). For a
    /// refresh the old refresh token stays valid: try again with it.
    #[error("amoCRM did not answer within {0:?}")]
    Timeout(Duration),
    /// The connection failed (DNS, refused, reset, TLS).
    #[error("cannot reach amoCRM at {host}: {reason}")]
    Unreachable {
        /// The host the client tried.
        host: String,
        /// The transport error and its causes.
        reason: String,
    },
    /// The client refused to send the request: the host is not an account host on the
    /// allow-list ([`AmoClient::account_host`](super::AmoClient::account_host)).
    #[error("refused to call {host}: not an amoCRM account host on the allow-list")]
    HostNotAllowed {
        /// The refused host, cut to 100 characters.
        host: String,
    },
    /// A 2xx answer that is not what amoCRM sends (not JSON, a field missing, too large).
    #[error("amoCRM sent a response that is not what was expected: {0}")]
    BadResponse(String),
}

crate::named_values::named_values! {
    /// Why a call to amoCRM failed, as audit rows, events, logs and metrics name it.
    pub(crate) enum AmoFailure {
        Rejected => "amocrm_rejected",
        Error => "amocrm_error",
        Timeout => "amocrm_timeout",
        Unreachable => "amocrm_unreachable",
        BadResponse => "amocrm_bad_response",
    }
}

impl AmoError {
    pub(crate) fn failure(&self) -> AmoFailure {
        match self {
            Self::Rejected { .. } => AmoFailure::Rejected,
            Self::Http { .. } | Self::Redirect { .. } => AmoFailure::Error,
            Self::Timeout(_) => AmoFailure::Timeout,
            // Refused before any connection: amoCRM was not reached.
            Self::Unreachable { .. } | Self::HostNotAllowed { .. } => AmoFailure::Unreachable,
            Self::BadResponse(_) => AmoFailure::BadResponse,
        }
    }

    /// A stable snake_case name for logs and metrics: `amocrm_rejected`, `amocrm_error`,
    /// `amocrm_timeout`, `amocrm_unreachable` or `amocrm_bad_response`.
    pub fn reason(&self) -> &'static str {
        self.failure().as_str()
    }

    /// amoCRM's problem+json body, when it sent one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Self::Rejected { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The kind of amoCRM's problem+json body, when it sent one.
    pub fn problem_kind(&self) -> Option<ProblemKind> {
        self.problem().map(Problem::kind)
    }

    /// Whether a refresh failed for good: amoCRM will never accept this refresh token again
    /// (revoked, superseded by a used successor, or expired), so the user must consent anew.
    /// Every other refresh failure leaves the old refresh token valid (amoCRM's grace rule).
    pub fn revokes_grant(&self) -> bool {
        matches!(
            self.problem_kind(),
            Some(ProblemKind::TokenRevoked | ProblemKind::TokenExpired)
        )
    }

    /// A 401 or 404 that is not about the token: the account may have moved to a new
    /// subdomain.
    pub(super) fn account_may_have_moved(&self) -> bool {
        match self {
            Self::Rejected { status: 404, .. }
            | Self::Http { status: 404 }
            | Self::Http { status: 401 } => true,
            Self::Rejected {
                status: 401,
                problem,
            } => matches!(problem.kind(), ProblemKind::Other),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(hint: &str) -> Problem {
        Problem {
            hint: Some(hint.into()),
            ..Problem::default()
        }
    }

    #[test]
    fn hints_map_to_kinds() {
        assert_eq!(
            problem("Authorization code has been revoked").kind(),
            ProblemKind::CodeRevoked
        );
        assert_eq!(
            problem("Authorization code has expired").kind(),
            ProblemKind::CodeExpired
        );
        assert_eq!(
            problem("Cannot decrypt the authorization code").kind(),
            ProblemKind::CodeInvalid
        );
        assert_eq!(
            problem("Token has been revoked").kind(),
            ProblemKind::TokenRevoked
        );
        assert_eq!(
            problem("Token has expired").kind(),
            ProblemKind::TokenExpired
        );
        assert_eq!(
            problem("Cannot decrypt the refresh token").kind(),
            ProblemKind::TokenRevoked
        );
        let client = Problem {
            title: Some("Некорректный клиент".into()),
            ..Problem::default()
        };
        assert_eq!(client.kind(), ProblemKind::InvalidClient);
    }

    proptest::proptest! {
        /// Any body, even almost-JSON, is parsed or refused without panicking.
        #[test]
        fn any_error_body_is_handled(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
                                     hint in ".{0,80}") {
            let _ = Problem::parse(&body);
            let json = serde_json::json!({ "hint": hint, "status": 401 }).to_string();
            let problem = Problem::parse(json.as_bytes()).expect("a problem with a hint");
            let _ = problem.kind();
            proptest::prop_assert!(problem.summary().chars().count() <= 300);
        }
    }

    #[test]
    fn only_revoked_or_expired_grants_need_a_new_consent() {
        let rejected = |status, hint: &str| AmoError::Rejected {
            status,
            problem: problem(hint),
        };
        assert!(rejected(401, "Token has been revoked").revokes_grant());
        assert!(rejected(401, "Token has expired").revokes_grant());
        assert!(!AmoError::Http { status: 500 }.revokes_grant());
        assert!(!AmoError::Timeout(Duration::from_secs(1)).revokes_grant());
        assert!(AmoError::Http { status: 404 }.account_may_have_moved());
        assert!(!rejected(401, "Token has been revoked").account_may_have_moved());
    }

    #[test]
    fn amocrm_problem_json_parses() {
        let body = br#"{"hint":"Token has been revoked","title":"\u041d\u0435\u043a\u043e\u0440\u0440\u0435\u043a\u0442\u043d\u044b\u0439 \u0437\u0430\u043f\u0440\u043e\u0441","type":"https://developers.amocrm.ru/v3/errors/OAuthProblemJson","status":401,"detail":"x"}"#;
        let problem = Problem::parse(body).unwrap();
        assert_eq!(problem.status, Some(401));
        assert_eq!(problem.kind(), ProblemKind::TokenRevoked);
        assert!(Problem::parse(b"<html>oops</html>").is_none());
        assert!(Problem::parse(b"{}").is_none());
        assert!(Problem::parse(b"[1,2]").is_none());
    }
}
