//! `Secret`: a string whose value never reaches a log line, a page or an error by accident.

use std::fmt;

/// A secret string (client secret, authorization code, access or refresh token, key).
///
/// Its `Debug` prints `***` and it has no `Display`, so formatting a value that holds one
/// (a [`TokenSet`](crate::amocrm::TokenSet), a [`ClientConfig`](crate::amocrm::ClientConfig),
/// an error) never shows it. Read the value with [`expose`](Self::expose), only where it is
/// sent or stored.
///
/// ```
/// use amoauth::Secret;
///
/// let token = Secret::new("def50200abc");
/// assert_eq!(format!("{token:?}"), "***");
/// assert_eq!(token.expose(), "def50200abc");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that sends or stores it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}
