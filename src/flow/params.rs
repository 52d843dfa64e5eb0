//! Untrusted input of the flow: callback query parameters and account hosts.

/// Longest accepted values; real ones are far shorter (a code is ~700 characters).
const MAX_CODE: usize = 4096;
const MAX_STATE: usize = 256;
const MAX_HOST: usize = 253;
const MAX_OTHER: usize = 256;

/// Longest `external_id`, in characters as the API document counts them (the columns are
/// VARCHAR(255), which count characters too).
pub const MAX_EXTERNAL_ID: usize = 255;

/// A host app's tenant id: 1 to `MAX_EXTERNAL_ID` characters, no NUL (PostgreSQL text
/// cannot hold one).
pub fn is_valid_external_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_EXTERNAL_ID && !id.contains('\0')
}

/// The callback's query, each parameter at most once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallbackParams {
    pub code: Option<String>,
    pub state: Option<String>,
    pub referer: Option<String>,
    pub client_id: Option<String>,
    pub error: Option<String>,
    pub from_widget: Option<String>,
}

impl CallbackParams {
    /// Parses a raw query string. Repeated or overlong parameters are refused: a callback
    /// from amoCRM never has them, and picking one of two values invites confusion attacks.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut params = Self::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let (slot, limit) = match name.as_ref() {
                "code" => (&mut params.code, MAX_CODE),
                "state" => (&mut params.state, MAX_STATE),
                "referer" => (&mut params.referer, MAX_HOST),
                "client_id" => (&mut params.client_id, MAX_OTHER),
                "error" => (&mut params.error, MAX_OTHER),
                "from_widget" => (&mut params.from_widget, MAX_OTHER),
                // amoCRM may add parameters (e.g. `platform`); they carry nothing we need.
                _ => continue,
            };
            if slot.is_some() {
                return Err(format!("parameter `{name}` appears more than once"));
            }
            if value.len() > limit {
                return Err(format!("parameter `{name}` is longer than {limit} bytes"));
            }
            if value.contains('\0') {
                return Err(format!("parameter `{name}` contains a NUL byte"));
            }
            *slot = Some(value.into_owned());
        }
        Ok(params)
    }
}

/// The hex digits of creation time that begin a state.
pub const TIME_PREFIX_LEN: usize = 16;
/// A state's length: the time prefix and 64 hex digits of randomness (256 bits).
pub const STATE_LEN: usize = TIME_PREFIX_LEN + 64;

/// A well-formed state is `STATE_LEN` lowercase hex characters, or 64 for a state issued
/// before the time prefix.
pub fn is_well_formed_state(state: &str) -> bool {
    (state.len() == STATE_LEN || state.len() == 64)
        && state
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_ids_count_characters_not_bytes() {
        assert!(is_valid_external_id(&"я".repeat(MAX_EXTERNAL_ID)));
        assert!(!is_valid_external_id(&"я".repeat(MAX_EXTERNAL_ID + 1)));
        assert!(is_valid_external_id(&"t".repeat(MAX_EXTERNAL_ID)));
        assert!(!is_valid_external_id(""));
        assert!(!is_valid_external_id("t\0"));
    }

    #[test]
    fn callback_query_parses_and_refuses_repeats() {
        let params =
            CallbackParams::parse("code=c1&state=s1&referer=a.amocrm.ru&client_id=id&platform=1")
                .unwrap();
        assert_eq!(params.code.as_deref(), Some("c1"));
        assert_eq!(params.referer.as_deref(), Some("a.amocrm.ru"));
        assert!(CallbackParams::parse("state=a&state=b").is_err());
        assert!(CallbackParams::parse(&format!("state={}", "a".repeat(300))).is_err());
        assert!(CallbackParams::parse("state=a%00b").is_err());
    }

    proptest::proptest! {
        /// Any query parses or is refused; nothing panics, and what parses respects the limits.
        #[test]
        fn any_callback_query_is_parsed_or_refused(query in ".{0,600}") {
            if let Ok(params) = CallbackParams::parse(&query) {
                for value in [&params.code, &params.state, &params.referer].into_iter().flatten() {
                    proptest::prop_assert!(!value.contains('\0') && value.len() <= MAX_CODE);
                }
            }
        }
    }

    #[test]
    fn states_must_be_lowercase_hex_of_the_right_length() {
        assert!(is_well_formed_state(&"ab".repeat(40)));
        assert!(is_well_formed_state(&"ab".repeat(32)));
        assert!(!is_well_formed_state(&"ab".repeat(36)));
        assert!(!is_well_formed_state(&"ab".repeat(41)));
        assert!(!is_well_formed_state(&"AB".repeat(32)));
        assert!(!is_well_formed_state("' OR 1=1 --"));
    }
}
