//! amoCRM account hosts: the allow-list every outbound request's host must pass.

/// Longest DNS name.
const MAX_HOST: usize = 253;

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
        ] {
            assert!(account_host(bad, &domains()).is_none(), "accepted {bad:?}");
        }
    }
}
