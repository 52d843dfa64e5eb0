//! Untrusted input of the flow: callback query parameters and account hosts.

/// Longest accepted values; real ones are far shorter (a code is ~700 characters).
const MAX_CODE: usize = 4096;
const MAX_STATE: usize = 256;
const MAX_HOST: usize = 253;
const MAX_OTHER: usize = 256;

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

/// An amoCRM account host that passed the allow-list, e.g. `fastis02.amocrm.ru`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountHost {
    pub host: String,
    pub subdomain: String,
    pub domain: String,
}

/// Accepts exactly `<label>.<domain>` with `domain` from the allow-list and `label` a
/// lowercase DNS label. No scheme, port, path, userinfo, uppercase or extra labels: the
/// client secret is posted to this host, so anything unusual is refused.
pub fn account_host(candidate: &str, domains: &[String]) -> Option<AccountHost> {
    if candidate.is_empty() || candidate.len() > MAX_HOST {
        return None;
    }
    let (subdomain, domain) = candidate.split_once('.')?;
    if !is_dns_label(subdomain) || !domains.iter().any(|allowed| allowed == domain) {
        return None;
    }
    Some(AccountHost {
        host: candidate.to_owned(),
        subdomain: subdomain.to_owned(),
        domain: domain.to_owned(),
    })
}

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
pub fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-')
}

/// A well-formed state is 64 lowercase hex characters (256 bits).
pub fn is_well_formed_state(state: &str) -> bool {
    state.len() == 64
        && state
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec!["amocrm.ru".into(), "amocrm.com".into(), "kommo.com".into()]
    }

    #[test]
    fn account_hosts_on_allowed_domains_pass() {
        let host = account_host("fastis02.amocrm.ru", &domains()).unwrap();
        assert_eq!(host.subdomain, "fastis02");
        assert_eq!(host.domain, "amocrm.ru");
        assert!(account_host("my-shop.kommo.com", &domains()).is_some());
        assert!(account_host("a.amocrm.com", &domains()).is_some());
    }

    #[test]
    fn hostile_referers_are_refused() {
        for bad in [
            "",
            "evil.example.com",
            "fastis02.amocrm.ru.evil.com",
            "x@evil.com",
            "x@fastis02.amocrm.ru",
            "https://fastis02.amocrm.ru",
            "fastis02.amocrm.ru:8443",
            "fastis02.amocrm.ru/",
            "FASTIS02.amocrm.ru",
            "fastis02.AMOCRM.RU",
            "amocrm.ru",
            ".amocrm.ru",
            "a.b.amocrm.ru",
            "-x.amocrm.ru",
            "x-.amocrm.ru",
            "fastis02.amocrm.ru.",
            "fastis02.amocrm\u{2024}ru",
            "fаstis02.amocrm.ru",
            "fastis02%2eamocrm.ru",
            "fastis02.amocrm.ru\0",
        ] {
            assert!(account_host(bad, &domains()).is_none(), "accepted {bad:?}");
        }
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

    #[test]
    fn states_must_be_256_bit_hex() {
        assert!(is_well_formed_state(&"ab".repeat(32)));
        assert!(!is_well_formed_state(&"AB".repeat(32)));
        assert!(!is_well_formed_state("' OR 1=1 --"));
    }
}
