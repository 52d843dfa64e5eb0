//! amoCRM account hosts: the allow-list every outbound request's host must pass.

/// Longest DNS name.
const MAX_HOST: usize = 253;

/// Labels on amoCRM's and Kommo's domains that name amoCRM's own sites, never accounts, so
/// the client secret and codes are never posted there (a taken-over documentation site would
/// receive both). Sources: `www` is the common domain of the consent page, where "requests
/// must not be made" (developers.kommo.com/docs/limitations); `developers` and `es-developers`
/// host the documentation (developers.kommo.com, es-developers.kommo.com); `api` and every
/// `api-<letter>` are the shared API hosts named by the token's `api_domain` claim
/// (`api-b.amocrm.ru`, `api-c.kommo.com`; amoCRM's PHP library, getSharedApiDomain).
/// Extend it when amoCRM documents another such host.
const NOT_ACCOUNT_LABELS: &[&str] = &["www", "developers", "es-developers", "api"];

/// An amoCRM account host that passed the allow-list, e.g. `fastis02.amocrm.ru`, from
/// [`AmoClient::account_host`](super::AmoClient::account_host).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountHost {
    /// The whole host, `{subdomain}.{domain}`.
    pub host: String,
    /// The account's subdomain, e.g. `fastis02`.
    pub subdomain: String,
    /// The allowed domain, e.g. `amocrm.ru`.
    pub domain: String,
}

/// Accepts exactly `<label>.<domain>` with `domain` from the allow-list and `label` a
/// lowercase DNS label. No scheme, port, path, userinfo, uppercase or extra labels: the
/// client secret is posted to this host, so anything unusual is refused.
pub(crate) fn account_host(candidate: &str, domains: &[String]) -> Option<AccountHost> {
    if candidate.is_empty() || candidate.len() > MAX_HOST {
        return None;
    }
    let (subdomain, domain) = candidate.split_once('.')?;
    if !is_dns_label(subdomain)
        || !domains.iter().any(|allowed| allowed == domain)
        || NOT_ACCOUNT_LABELS.contains(&subdomain)
        || is_shared_api_label(subdomain)
    {
        return None;
    }
    Some(AccountHost {
        host: candidate.to_owned(),
        subdomain: subdomain.to_owned(),
        domain: domain.to_owned(),
    })
}

/// amoCRM's shared API hosts (`api_domain`), e.g. `api-b.amocrm.ru`: the only place a refresh
/// token goes for host rediscovery, and never an account host.
pub(super) fn shared_api_host(candidate: &str, domains: &[String]) -> Option<String> {
    let (label, domain) = candidate.split_once('.')?;
    (is_shared_api_label(label) && domains.iter().any(|allowed| allowed == domain))
        .then(|| candidate.to_owned())
}

/// `api-` and one lowercase letter.
fn is_shared_api_label(label: &str) -> bool {
    label
        .strip_prefix("api-")
        .is_some_and(|rest| rest.len() == 1 && rest.bytes().all(|b| b.is_ascii_lowercase()))
}

/// `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`
pub(crate) fn is_dns_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    let edge_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.first().is_some_and(edge_ok)
        && bytes.last().is_some_and(edge_ok)
        && bytes.iter().all(|b| edge_ok(b) || *b == b'-')
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
    fn shared_api_hosts_are_only_api_letter_hosts() {
        assert_eq!(
            shared_api_host("api-b.amocrm.ru", &domains()).as_deref(),
            Some("api-b.amocrm.ru")
        );
        for bad in [
            "api.amocrm.ru",
            "api-bb.amocrm.ru",
            "demo.amocrm.ru",
            "api-b.evil.com",
        ] {
            assert!(
                shared_api_host(bad, &domains()).is_none(),
                "accepted {bad:?}"
            );
        }
        // Account names that merely start like one stay accounts.
        assert!(account_host("api-shop.amocrm.ru", &domains()).is_some());
        assert!(account_host("www2.amocrm.ru", &domains()).is_some());
    }

    proptest::proptest! {
        /// Whatever the input, an accepted host is exactly one DNS label on an allowed domain.
        #[test]
        fn accepted_hosts_are_one_label_on_an_allowed_domain(candidate in "[a-zA-Z0-9.@:/%-]{0,40}(\\.amocrm\\.ru)?") {
            if let Some(host) = account_host(&candidate, &domains()) {
                proptest::prop_assert_eq!(host.host, format!("{}.{}", host.subdomain, host.domain));
                proptest::prop_assert!(is_dns_label(&host.subdomain));
                proptest::prop_assert!(domains().contains(&host.domain));
            }
        }
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
            "www.amocrm.ru",
            "www.kommo.com",
            "developers.kommo.com",
            "es-developers.kommo.com",
            "api.amocrm.ru",
            "api-b.amocrm.ru",
            "api-c.kommo.com",
        ] {
            assert!(account_host(bad, &domains()).is_none(), "accepted {bad:?}");
        }
    }
}
