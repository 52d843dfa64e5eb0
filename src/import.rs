//! `amoauth import`: takes over the connections of an earlier integration's `amocrm_tokens`
//! table (the seed app's: plain-text tokens) without reconnecting any account.
//!
//! Each pair is refreshed once on import: that proves the refresh token still works, gives
//! a fresh access token, and starts a known keep-alive clock. The old table's tokens are
//! superseded from then on, so the old app must stop using them.

use crate::amocrm::{Platform, account_host, is_dns_label};
use crate::config::{DatabaseUrl, Secret};
use crate::crypto::Cipher;
use crate::flow::{Grant, save_connection};
use crate::integrations::Integrations;
use crate::store::{Records, SeedToken, Store, StoreError};

/// What happened to one row of the old table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    Imported {
        account_id: i64,
    },
    /// Dry run: the row looks importable; nothing was refreshed or written.
    WouldImport,
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct ImportLine {
    /// The `domain` column as the old table had it.
    pub domain: String,
    pub outcome: ImportOutcome,
}

/// Imports every row of `amocrm_tokens` at `source` into `store`.
pub async fn import(
    source: &DatabaseUrl,
    store: &Store,
    integrations: &Integrations,
    cipher: &Cipher,
    dry_run: bool,
) -> Result<Vec<ImportLine>, StoreError> {
    let rows = Store::read_seed_tokens(source).await?;
    let existing = store.connections().await?;
    let mut report = Vec::with_capacity(rows.len());
    for row in rows {
        let outcome = import_one(&row, &existing, integrations, store, cipher, dry_run).await;
        report.push(ImportLine {
            domain: row.domain,
            outcome,
        });
    }
    Ok(report)
}

async fn import_one(
    row: &SeedToken,
    existing: &[crate::store::ConnectionRow],
    integrations: &Integrations,
    store: &Store,
    cipher: &Cipher,
    dry_run: bool,
) -> ImportOutcome {
    let candidate = row.domain.trim().to_ascii_lowercase();
    // The seed's table held both platforms' accounts: a kommo.com host is Kommo's; a bare
    // subdomain belongs to the default integration.
    let platform = match is_dns_label(&candidate) {
        true => integrations.default_platform(),
        false => Platform::of_domain(&candidate),
    };
    let Some(amo) = integrations.get(platform) else {
        return ImportOutcome::Skipped(format!(
            "`{}` is a {} account, but no {} integration is configured",
            row.domain,
            platform.title(),
            platform.title()
        ));
    };
    let domains = &amo.config().domains;
    // The seed stored the subdomain alone ("fastis02"); others store the host.
    let host = if is_dns_label(&candidate) {
        account_host(&format!("{candidate}.{}", domains[0]), domains)
    } else {
        account_host(&candidate, domains)
    };
    let Some(host) = host else {
        return ImportOutcome::Skipped(format!(
            "`{}` is not an amoCRM account host on AMOCRM_DOMAINS",
            row.domain
        ));
    };
    // Checked before any request: refreshing an imported pair again would revoke ours.
    if existing.iter().any(|c| c.domain == host.host) {
        return ImportOutcome::Skipped("already imported".into());
    }
    if row.refresh_token.trim().is_empty() {
        return ImportOutcome::Skipped("no refresh token in the row".into());
    }
    if dry_run {
        return ImportOutcome::WouldImport;
    }
    let tokens = match amo
        .refresh(&host.host, &Secret::new(row.refresh_token.trim()))
        .await
    {
        Ok(tokens) => tokens,
        Err(err) => {
            return ImportOutcome::Skipped(format!(
                "amoCRM did not refresh its token ({err}); connect this account again at /amocrm/install"
            ));
        }
    };
    let account = match amo.account(&host.host, &tokens.access_token).await {
        Ok(account) => account,
        Err(err) => {
            return ImportOutcome::Skipped(format!(
                "account lookup failed ({err}); run the import again"
            ));
        }
    };
    let issued = match crate::tokens::expiry(&tokens) {
        Ok(issued) => issued,
        Err(err) => return ImportOutcome::Skipped(format!("{err}; run the import again")),
    };
    let grant = Grant {
        platform: amo.config().platform,
        host: &host,
        tokens: &tokens,
        account: &account,
        lifetime: issued,
    };
    let saved = save_connection(store, cipher, &grant, None, &Records::default()).await;
    match saved {
        // Without an external_id a reconnect keeps the owner, so the account is never taken.
        Ok(_) => ImportOutcome::Imported {
            account_id: account.id,
        },
        Err(err) => ImportOutcome::Skipped(format!("could not save ({err}); run the import again")),
    }
}
