//! Reading an earlier integration's `amocrm_tokens` (the seed app's layout: `domain`,
//! `access_token`, `refresh_token` in plain text) for `amoauth import`. Read only.

use super::{Context as _, Store, StoreError, on_pool};
use crate::config::DatabaseUrl;

/// One row of the old table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SeedToken {
    pub domain: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl Store {
    /// Every row of `amocrm_tokens` in the database at `url`, which is not migrated or changed.
    pub async fn read_seed_tokens(url: &DatabaseUrl) -> Result<Vec<SeedToken>, StoreError> {
        let source = Store::connect(url).await?;
        let sql = source.sql(
            "SELECT COALESCE(domain, '') AS domain, COALESCE(access_token, '') AS access_token, \
             COALESCE(refresh_token, '') AS refresh_token FROM amocrm_tokens ORDER BY id",
        );
        let rows = on_pool!(source, pool => sqlx::query_as(sql).fetch_all(pool).await)
            .during("reading the old amocrm_tokens table");
        source.close().await;
        rows
    }
}
