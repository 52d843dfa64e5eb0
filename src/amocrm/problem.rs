//! amoCRM's errors: problem+json bodies with a `hint`, and the typed error of every call.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An amoCRM problem+json body (`title`, `type`, `status`, `detail`, plus `hint`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default, rename = "type")]
    pub problem_type: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default)]
    pub hint: Option<String>,
}

/// What a problem means for us, classified on its hint and status as amoCRM documents them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The code was already exchanged.
    CodeRevoked,
    CodeExpired,
    /// Not a code amoCRM issued (or issued for another client).
    CodeInvalid,
    /// A refresh token that was superseded or revoked.
    TokenRevoked,
    TokenExpired,
    /// Wrong client id or secret.
    InvalidClient,
    RedirectUriMismatch,
    Other,
}

impl Problem {
    /// Parses a body as problem+json when it looks like one.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let problem: Self = serde_json::from_slice(body).ok()?;
        (problem.title.is_some() || problem.hint.is_some() || problem.detail.is_some())
            .then_some(problem)
    }

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

    /// A one-line summary safe for logs and pages: amoCRM's words, never our secrets.
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

/// Why a call to amoCRM failed. Plain data, so a callback's result page can carry it.
#[derive(Clone, Debug, thiserror::Error, Serialize, Deserialize)]
pub enum AmoError {
    #[error("amoCRM rejected the request with HTTP {status}: {}", problem.summary())]
    Rejected { status: u16, problem: Problem },
    #[error("amoCRM answered HTTP {status} with a body that is not problem+json")]
    Http { status: u16 },
    #[error("amoCRM answered with a redirect (HTTP {status}); redirects are never followed")]
    Redirect { status: u16 },
    #[error("amoCRM did not answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot reach amoCRM at {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("amoCRM sent a response that is not what was expected: {0}")]
    BadResponse(String),
}

crate::named_values::named_values! {
    /// Why a call to amoCRM failed, as audit rows, events, logs and metrics name it.
    pub enum AmoFailure {
        Rejected => "amocrm_rejected",
        Error => "amocrm_error",
        Timeout => "amocrm_timeout",
        Unreachable => "amocrm_unreachable",
        BadResponse => "amocrm_bad_response",
    }
}

impl AmoError {
    pub fn failure(&self) -> AmoFailure {
        match self {
            Self::Rejected { .. } => AmoFailure::Rejected,
            Self::Http { .. } | Self::Redirect { .. } => AmoFailure::Error,
            Self::Timeout(_) => AmoFailure::Timeout,
            Self::Unreachable { .. } => AmoFailure::Unreachable,
            Self::BadResponse(_) => AmoFailure::BadResponse,
        }
    }

    /// A stable snake_case name for audit rows, events and logs.
    pub fn reason(&self) -> &'static str {
        self.failure().as_str()
    }

    pub fn problem_kind(&self) -> Option<ProblemKind> {
        match self {
            Self::Rejected { problem, .. } => Some(problem.kind()),
            _ => None,
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
