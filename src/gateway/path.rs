//! Which paths the gateway forwards: amoCRM's REST API only, never its OAuth endpoints, and
//! nothing that could climb out of the API by traversal or encoding tricks.

/// Path prefixes forwarded to amoCRM. `api/v4/` is amoCRM's API; `api/v2/` still serves a
/// few endpoints older integrations call (e.g. `api/v2/pipelines`). The OAuth endpoints
/// (`oauth`, `oauth2/…`) live outside both and are never reachable.
pub const FORWARDED_PREFIXES: &[&str] = &["api/v4/", "api/v2/"];

/// Why a path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("only amoCRM API paths (api/v4/…, api/v2/…) are forwarded")]
    NotApi,
    #[error(
        "the path has an empty, `.` or `..` segment, a backslash or an encoded `/`, `\\` or `.`"
    )]
    Traversal,
}

/// Checks the path after `/proxy/` exactly as the client sent it (still percent-encoded) and
/// returns it with a leading `/`, ready to send.
pub fn forwardable(raw: &str) -> Result<String, Refusal> {
    let lowered = raw.to_ascii_lowercase();
    if raw.contains('\\')
        || ["%2f", "%5c", "%2e", "%00"]
            .iter()
            .any(|encoded| lowered.contains(encoded))
        || raw.bytes().any(|b| b.is_ascii_control())
    {
        return Err(Refusal::Traversal);
    }
    // A trailing slash leaves one empty last segment, which is harmless.
    let segments: Vec<&str> = raw.split('/').collect();
    let (last, inner) = segments.split_last().ok_or(Refusal::NotApi)?;
    if inner
        .iter()
        .any(|segment| segment.is_empty() || *segment == "." || *segment == "..")
        || *last == "."
        || *last == ".."
    {
        return Err(Refusal::Traversal);
    }
    if !FORWARDED_PREFIXES
        .iter()
        .any(|prefix| raw.starts_with(prefix) && raw.len() > prefix.len())
    {
        return Err(Refusal::NotApi);
    }
    Ok(format!("/{raw}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_pass() {
        assert_eq!(forwardable("api/v4/leads").unwrap(), "/api/v4/leads");
        assert_eq!(
            forwardable("api/v4/leads/17/").unwrap(),
            "/api/v4/leads/17/"
        );
        assert_eq!(
            forwardable("api/v4/contacts/chats").unwrap(),
            "/api/v4/contacts/chats"
        );
        assert!(forwardable("api/v2/pipelines").is_ok());
        assert!(
            forwardable("api/v4/leads/%D0%B0").is_ok(),
            "other escapes pass"
        );
    }

    #[test]
    fn oauth_and_other_paths_are_refused() {
        for path in [
            "oauth2/access_token",
            "oauth",
            "oauth2/account/current/subdomain",
            "",
            "api/v4/",
            "api/v4",
            "api/v3/leads",
            "API/v4/leads",
            "private/api/v2/json/leads",
        ] {
            assert_eq!(forwardable(path), Err(Refusal::NotApi), "{path:?}");
        }
    }

    #[test]
    fn traversal_is_refused_however_spelled() {
        for path in [
            "api/v4/../../oauth2/access_token",
            "api/v4/leads/..",
            "api/v4/./leads",
            "api/v4//leads",
            "api/v4/%2e%2e/%2e%2e/oauth2/access_token",
            "api/v4/%2E%2E/oauth2",
            "api/v4/leads%2f..%2f..%2foauth2",
            "api/v4/leads%5c..",
            "api/v4/leads\\..\\oauth2",
            "api/v4/leads%00",
            "api/v4/le\nads",
        ] {
            assert_eq!(forwardable(path), Err(Refusal::Traversal), "{path:?}");
        }
    }
}
