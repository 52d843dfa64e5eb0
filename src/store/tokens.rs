//! `amocrm_tokens`: connected accounts and their sealed tokens.

use rusqlite::params_from_iter;

use super::attempts::{self, write_records};
use super::inline::IntoOwnedRow as _;
use super::{
    BeginWrite as _, Context as _, Records, Store, StoreError, Timestamp, on_hot_path, on_pool,
};
use crate::amocrm::Platform;
use crate::crypto::{Sealed, SealedPair};

/// A connection to save after a successful callback. Both tokens are sealed with one key.
pub struct NewConnection<'a> {
    /// With the account id, the connection's key: each platform numbers its accounts.
    pub platform: Platform,
    /// The account's id on its platform.
    pub account_id: i64,
    /// The host app's tenant id, from a connect link; a reconnect without one keeps the old.
    pub external_id: Option<&'a str>,
    /// The account's name, as amoCRM gives it.
    pub account_name: &'a str,
    /// The account's host, e.g. `example.amocrm.ru`.
    pub domain: &'a str,
    /// The account's subdomain, e.g. `example`.
    pub subdomain: &'a str,
    /// The new pair, sealed.
    pub tokens: &'a SealedPair,
    /// When the access token expires.
    pub expires_at: Timestamp,
    /// When the refresh token expires unless used.
    pub refresh_expires_at: Timestamp,
    /// The token and account responses with every token value removed.
    pub raw: &'a str,
    /// The time of the save.
    pub now: Timestamp,
}

crate::named_values::named_values! {
    /// The values of `amocrm_tokens.status` (`ConnectionRow::status`).
    pub enum ConnectionStatus {
        Active => "active",
        NeedsReauth => "needs_reauth",
        Disconnected => "disconnected",
    }
}

#[derive(Clone, Debug)]
pub struct ConnectionRow {
    pub id: i64,
    /// Whose integration holds the connection: its refreshes use that one's secret.
    pub platform: Platform,
    pub account_id: Option<i64>,
    pub external_id: Option<String>,
    pub account_name: Option<String>,
    pub domain: String,
    pub subdomain: String,
    pub access_token: Option<Sealed>,
    pub refresh_token: Option<Sealed>,
    pub expires_at: Timestamp,
    pub refresh_expires_at: Timestamp,
    /// When the current pair was issued: its age drives the keep-alive refresh.
    pub issued_at: Timestamp,
    pub status: ConnectionStatus,
    pub raw: Option<String>,
    pub last_refresh_at: Option<Timestamp>,
    pub last_error: Option<String>,
    pub refresh_failures: i64,
    /// The worker leaves the connection alone until then after a failure (backoff).
    pub next_refresh_at: Option<Timestamp>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<Timestamp>,
    /// Bumped by every write of the token pair; a refresh writes only if it is unchanged.
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A refreshed pair to store.
pub struct RefreshedPair<'a> {
    pub tokens: &'a SealedPair,
    pub expires_at: Timestamp,
    pub refresh_expires_at: Timestamp,
    pub issued_at: Timestamp,
}

/// Every column of a connection, in `StoredConnection`'s order (`StoredConnection::from_sqlite`);
/// or with the refresh token and the raw responses replaced by the given expressions.
macro_rules! connection_columns {
    () => {
        connection_columns!("refresh_token", "raw")
    };
    ($refresh_token:literal, $raw:literal) => {
        concat!(
            "id, account_id, external_id, account_name, domain, subdomain, access_token, ",
            $refresh_token,
            ", key_id, expires_at, refresh_expires_at, issued_at, status, ",
            $raw,
            ", last_refresh_at, last_error, refresh_failures, next_refresh_at, lease_owner, \
             lease_until, version, created_at, updated_at, platform"
        )
    };
}
macro_rules! select_connection {
    () => {
        concat!("SELECT ", connection_columns!(), " FROM amocrm_tokens")
    };
}
/// The token call's one statement: the connection and, beside it, the stored hash of the
/// presented API key if that key is active (a scalar subquery, so no join is needed). A token
/// call needs neither the refresh token (a refresh reads the row again) nor the raw responses,
/// the row's largest value: a NULL of a text type in their places, as every backend decodes it.
macro_rules! keyed_connection {
    () => {
        concat!(
            "SELECT ",
            connection_columns!(
                "CAST(NULL AS CHAR) AS refresh_token",
                "CAST(NULL AS CHAR) AS raw"
            ),
            ", (",
            super::api_keys::active_key_hash!(),
            ") AS key_hash FROM amocrm_tokens"
        )
    };
}
/// Where `find_connections` and the token call look an account up: by id (one row per
/// platform, so at most two, put in order by `first_per_platform` rather than in a temporary
/// b-tree on every token call), or by subdomain or host (bound twice; the
/// oldest rows first, as a renamed account's subdomain may linger on an older row).
macro_rules! by_account_id {
    () => {
        " WHERE account_id = ?"
    };
}
macro_rules! by_account_name {
    () => {
        " WHERE subdomain = ? OR domain = ? ORDER BY id LIMIT 2"
    };
}
const KEYED_BY_ACCOUNT_ID: &str = concat!(keyed_connection!(), by_account_id!());
const KEYED_BY_ACCOUNT_NAME: &str = concat!(keyed_connection!(), by_account_name!());
/// The position of `key_hash` in a keyed row: after the connection's 24 columns.
const KEY_HASH_COLUMN: usize = 24;

/// What saving a connection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Inserted, or the account's row updated.
    Saved,
    /// The account belongs to another `external_id`; nothing was changed.
    AccountTaken,
}

/// A reconnect replaces the pair and starts its bookkeeping afresh (no failures, no backoff,
/// issued now), as a first connect does; the lease is left to its holder, whose write then
/// fails the version check.
macro_rules! reconnect_update {
    () => {
        "UPDATE amocrm_tokens SET account_name = ?, domain = ?, subdomain = ?, access_token = ?, \
         refresh_token = ?, key_id = ?, expires_at = ?, refresh_expires_at = ?, issued_at = ?, \
         status = 'active', raw = ?, last_refresh_at = NULL, last_error = NULL, \
         refresh_failures = 0, next_refresh_at = NULL, version = version + 1, updated_at = ?"
    };
}
/// The columns a disconnect wipes.
macro_rules! disconnect_update {
    () => {
        "UPDATE amocrm_tokens SET status = 'disconnected', access_token = NULL, \
         refresh_token = NULL, key_id = NULL, lease_owner = NULL, lease_until = NULL, \
         version = version + 1, updated_at = ?"
    };
}

/// Binds what a (re)connect writes (`connection_values`) to a sqlx query.
macro_rules! bind_pair {
    ($query:expr, $c:expr) => {{
        let v = connection_values($c);
        $query
            .bind(v.0)
            .bind(v.1)
            .bind(v.2)
            .bind(v.3)
            .bind(v.4)
            .bind(v.5)
            .bind(v.6)
            .bind(v.7)
            .bind(v.8)
            .bind(v.9)
    }};
}

/// What a (re)connect writes, from `account_name` to `raw`, in the column order that
/// `reconnect_update!` and `INSERT_CONNECTION` share.
type ConnectionValues<'c> = (
    &'c str,
    &'c str,
    &'c str,
    &'c str,
    &'c str,
    &'c str,
    Timestamp,
    Timestamp,
    Timestamp,
    &'c str,
);

fn connection_values<'c>(c: &'c NewConnection<'_>) -> ConnectionValues<'c> {
    (
        c.account_name,
        c.domain,
        c.subdomain,
        &c.tokens.access_token.ciphertext,
        &c.tokens.refresh_token.ciphertext,
        &c.tokens.access_token.key_id,
        c.expires_at,
        c.refresh_expires_at,
        c.now,
        c.raw,
    )
}

/// A second row for the same key: the account is connected for another `external_id`.
fn is_unique_violation(err: &rusqlite::Error) -> bool {
    matches!(
        err,
        rusqlite::Error::SqliteFailure(failure, _)
            if failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
    )
}

/// Without an `external_id` (the admin's install, a widget install) the owner stays.
const RECONNECT_KEEPING_OWNER: &str = concat!(
    reconnect_update!(),
    " WHERE account_id = ? AND platform = ?"
);
/// With one, only an account without an owner or with the same one is taken.
const RECONNECT_FOR_OWNER: &str = concat!(
    reconnect_update!(),
    ", external_id = ? WHERE account_id = ? AND platform = ? \
     AND (external_id IS NULL OR external_id = ?)"
);
/// Which disconnect: the uninstall webhook's, only of the pair amoCRM was asked about, or the
/// admin's, which also releases the account from its `external_id` (the one way an account
/// moves to another tenant).
#[derive(Debug, Clone, Copy)]
pub enum Disconnect {
    /// The webhook's: only if the pair is still at `version`.
    Unchanged {
        /// The pair's version amoCRM was asked about.
        version: i64,
    },
    /// The admin's: whatever the pair, and the account leaves its `external_id`.
    ByAdmin,
}
const DISCONNECT_UNCHANGED: &str = concat!(
    disconnect_update!(),
    " WHERE account_id = ? AND platform = ? AND status <> 'disconnected' AND version = ?"
);
const DISCONNECT_BY_ADMIN: &str = concat!(
    disconnect_update!(),
    ", external_id = NULL WHERE account_id = ? AND platform = ? AND status <> 'disconnected'"
);
const INSERT_CONNECTION: &str = "INSERT INTO amocrm_tokens (account_id, external_id, account_name, \
     domain, subdomain, access_token, refresh_token, key_id, expires_at, refresh_expires_at, \
     issued_at, status, raw, last_refresh_at, last_error, refresh_failures, version, created_at, \
     updated_at, platform) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'active', ?, NULL, NULL, 0, 1, ?, ?, ?)";

#[doc(hidden)]
impl Store {
    /// Inserts the account's connection or replaces its tokens when it reconnects, with
    /// `records` in the same transaction; the account id is the key because subdomains can
    /// be renamed. An account never moves to another `external_id` here: that needs the
    /// admin (`Disconnect::ByAdmin`). `AccountTaken` changes and records nothing.
    pub async fn upsert_connection(
        &self,
        c: &NewConnection<'_>,
        records: &Records<'_>,
    ) -> Result<Saved, StoreError> {
        const OPERATION: &str = "saving the connection's tokens";
        on_hot_path!(self, db => {
            let p = connection_values(c);
            let platform = c.platform.as_str();
            let (reconnect, reconnect_values) = match c.external_id {
                Some(owner) => (RECONNECT_FOR_OWNER, (
                    p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7, p.8, p.9, c.now, owner,
                    c.account_id, platform, owner,
                ).owned()),
                None => (RECONNECT_KEEPING_OWNER, (
                    p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7, p.8, p.9, c.now, c.account_id,
                    platform,
                ).owned()),
            };
            let reconnect_values = reconnect_values.during(OPERATION)?;
            let insert_values = (
                c.account_id, c.external_id, p.0, p.1, p.2, p.3, p.4, p.5, p.6, p.7, p.8, p.9,
                c.now, c.now, platform,
            ).owned().during(OPERATION)?;
            let records = records.owned(c.account_id, c.now).during(OPERATION)?;
            db.write(OPERATION, move |tx| {
                // The write lock is taken at BEGIN, so no other insert can race this one.
                let updated = tx
                    .prepare_cached(reconnect)?
                    .execute(params_from_iter(&reconnect_values))?;
                if updated == 0 {
                    let inserted = tx
                        .prepare_cached(INSERT_CONNECTION)?
                        .execute(params_from_iter(&insert_values));
                    match inserted {
                        Ok(_) => {}
                        // Another owner's row: the failed statement changed nothing.
                        Err(err) if is_unique_violation(&err) => return Ok(Saved::AccountTaken),
                        Err(err) => return Err(err),
                    }
                }
                attempts::write_records_inline(tx, &records)?;
                Ok(Saved::Saved)
            })
            .await
        }, pool => {
            // An insert racing ours makes the first update miss and our insert collide: the
            // second try's update then sees the row. A collision aborts the transaction on
            // PostgreSQL, so each try has its own.
            for _ in 0..2 {
                let reconnect = self.sql(match c.external_id {
                    Some(_) => RECONNECT_FOR_OWNER,
                    None => RECONNECT_KEEPING_OWNER,
                });
                let insert = self.sql(INSERT_CONNECTION);
                let saved: bool = {
                    // The callback's state is consumed by now: a pooled connection the server
                    // closed during a restart (they are not pinged at checkout) must not cost
                    // the user the install, so a failed BEGIN gets one more connection.
                    let tx = match pool.begin_write().await {
                        Err(sqlx::Error::Io(_)) => pool.begin_write().await,
                        begun => begun,
                    };
                    let mut tx = tx.during(OPERATION)?;
                    let query = bind_pair!(sqlx::query(reconnect), c).bind(c.now);
                    let query = match c.external_id {
                        Some(owner) => query
                            .bind(owner)
                            .bind(c.account_id)
                            .bind(c.platform.as_str())
                            .bind(owner),
                        None => query.bind(c.account_id).bind(c.platform.as_str()),
                    };
                    let mut saved =
                        query.execute(&mut *tx).await.during(OPERATION)?.rows_affected() == 1;
                    if !saved {
                        let query = sqlx::query(insert).bind(c.account_id).bind(c.external_id);
                        let inserted = bind_pair!(query, c)
                            .bind(c.now)
                            .bind(c.now)
                            .bind(c.platform.as_str())
                            .execute(&mut *tx)
                            .await;
                        saved = match inserted {
                            Ok(_) => true,
                            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => false,
                            Err(cause) => return Err(StoreError::Database { operation: OPERATION, cause }),
                        };
                    }
                    if saved {
                        write_records!(self, tx, records, c.account_id, c.now, OPERATION);
                        tx.commit().await.during(OPERATION)?;
                    }
                    saved
                };
                if saved {
                    return Ok(Saved::Saved);
                }
            }
            Ok(Saved::AccountTaken)
        })
    }

    pub async fn connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let sql = self.sql(concat!(select_connection!(), " ORDER BY id"));
        let rows: Vec<StoredConnection> =
            on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
                .during("listing connections")?;
        Ok(rows.into_iter().map(ConnectionRow::from).collect())
    }

    /// Connections of one tenant of the host app.
    pub async fn connections_of(
        &self,
        external_id: &str,
    ) -> Result<Vec<ConnectionRow>, StoreError> {
        let sql = self.sql(concat!(
            select_connection!(),
            " WHERE external_id = ? ORDER BY id"
        ));
        let rows: Vec<StoredConnection> =
            on_pool!(self, pool => sqlx::query_as(sql).bind(external_id).fetch_all(pool).await)
                .during("listing the tenant's connections")?;
        Ok(rows.into_iter().map(ConnectionRow::from).collect())
    }

    pub async fn connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
        let sql = self.sql(concat!(select_connection!(), " WHERE id = ?"));
        let row: Option<StoredConnection> =
            on_pool!(self, pool => sqlx::query_as(sql).bind(id).fetch_optional(pool).await)
                .during("reading the connection")?;
        Ok(row.map(ConnectionRow::from))
    }

    /// Finds a connection by account id (digits) or by subdomain or host, optionally
    /// qualified by its platform (`kommo:31337001`, `amocrm:fastis02`); the first of
    /// [`find_connections`](Self::find_connections).
    pub async fn find_connection(
        &self,
        account: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        Ok(self.find_connections(account).await?.into_iter().next())
    }

    /// The connection `account` names on each platform, oldest first: one, or for a bare id
    /// or subdomain both platforms' accounts with it (an id is unique per platform only).
    /// Within a platform the first match wins, as it always did (a renamed account's
    /// subdomain may linger on an older row).
    pub async fn find_connections(&self, account: &str) -> Result<Vec<ConnectionRow>, StoreError> {
        let Some((platform, account)) = qualified(account) else {
            return Ok(Vec::new());
        };
        let rows: Vec<StoredConnection> = match account.parse::<i64>() {
            Ok(account_id) => {
                let sql = self.sql(concat!(select_connection!(), by_account_id!()));
                on_pool!(self, pool => sqlx::query_as(sql).bind(account_id).fetch_all(pool).await)
            }
            Err(_) => {
                let sql = self.sql(concat!(select_connection!(), by_account_name!()));
                on_pool!(self, pool => sqlx::query_as(sql).bind(account).bind(account).fetch_all(pool).await)
            }
        }
        .during("finding the connection")?;
        Ok(first_per_platform(platform, rows))
    }

    /// The token call in one statement: the connections `account` names (as
    /// `find_connections`), with the stored hash of the API key `key_id` when that key is
    /// active (else `None`). With no connection the key is left unchecked: `(None, [])`.
    pub async fn keyed_connections(
        &self,
        key_id: &str,
        account: &str,
    ) -> Result<(Option<String>, Vec<ConnectionRow>), StoreError> {
        const OPERATION: &str = "finding the connection";
        let Some((platform, account)) = qualified(account) else {
            return Ok((None, Vec::new()));
        };
        let account_id = account.parse::<i64>().ok();
        let sql = match account_id {
            Some(_) => KEYED_BY_ACCOUNT_ID,
            None => KEYED_BY_ACCOUNT_NAME,
        };
        let rows: Vec<KeyedConnection> = on_hot_path!(self, db => {
            // Kept until the next commit (`read_cached`), so a revoked key, a disconnect or
            // a refreshed pair is read by the very next call. The token stays sealed there.
            let cache_key = format!("keyed {} {key_id}{account}", key_id.len());
            db.read_cached(OPERATION, &cache_key, |conn| {
                let mut statement = conn.prepare_cached(sql)?;
                let keyed = |row: &rusqlite::Row<'_>| {
                    Ok(KeyedConnection {
                        connection: StoredConnection::from_sqlite(row)?,
                        key_hash: row.get(KEY_HASH_COLUMN)?,
                    })
                };
                match account_id {
                    Some(id) => statement.query_map((key_id, id), keyed)?.collect(),
                    None => statement.query_map((key_id, account, account), keyed)?.collect(),
                }
            })
            .await?
        }, pool => {
            let query = sqlx::query_as(self.sql(sql)).bind(key_id);
            let query = match account_id {
                Some(id) => query.bind(id),
                None => query.bind(account).bind(account),
            };
            query.fetch_all(pool).await.during(OPERATION)?
        });
        let key_hash = rows.first().and_then(|row| row.key_hash.clone());
        let rows = rows.into_iter().map(|row| row.connection).collect();
        Ok((key_hash, first_per_platform(platform, rows)))
    }

    /// Active connections the worker should refresh: the access token expires before
    /// `expiring_before`, or the pair was issued before `issued_before` (keep-alive); not in
    /// backoff and not leased. Returns (id, version) pairs, most urgent first.
    pub async fn due_for_refresh(
        &self,
        now: Timestamp,
        expiring_before: Timestamp,
        issued_before: Timestamp,
        limit: i64,
    ) -> Result<Vec<(i64, i64)>, StoreError> {
        let sql = self.sql(
            "SELECT id, version FROM amocrm_tokens WHERE status = 'active' \
             AND (expires_at < ? OR issued_at < ?) \
             AND (next_refresh_at IS NULL OR next_refresh_at <= ?) \
             AND (lease_until IS NULL OR lease_until <= ?) ORDER BY expires_at LIMIT ?",
        );
        on_pool!(self, pool => sqlx::query_as(sql)
            .bind(expiring_before)
            .bind(issued_before)
            .bind(now)
            .bind(now)
            .bind(limit)
            .fetch_all(pool)
            .await)
        .during("finding connections due for refresh")
    }

    /// Takes the refresh lease when it is free or expired. Only the holder refreshes.
    pub async fn take_lease(
        &self,
        id: i64,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE amocrm_tokens SET lease_owner = ?, lease_until = ? \
             WHERE id = ? AND (lease_until IS NULL OR lease_until <= ?)",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(owner)
            .bind(until)
            .bind(id)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1))
        .during("taking the refresh lease")
    }

    pub async fn release_lease(&self, id: i64, owner: &str) -> Result<(), StoreError> {
        let sql = self.sql(
            "UPDATE amocrm_tokens SET lease_owner = NULL, lease_until = NULL \
             WHERE id = ? AND lease_owner = ?",
        );
        on_pool!(self, pool => sqlx::query(sql).bind(id).bind(owner).execute(pool).await.map(drop))
            .during("releasing the refresh lease")
    }

    /// Stores a refreshed pair if nobody wrote the pair since `version` was read, and
    /// releases the lease, with `records` in the same transaction. False when another writer
    /// won (nothing is written): the caller must not use its pair.
    pub async fn store_refreshed(
        &self,
        id: i64,
        version: i64,
        pair: &RefreshedPair<'_>,
        records: &Records<'_>,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "saving the refreshed tokens";
        let sql = self.sql(
            "UPDATE amocrm_tokens SET access_token = ?, refresh_token = ?, key_id = ?, \
             expires_at = ?, refresh_expires_at = ?, issued_at = ?, last_refresh_at = ?, \
             last_error = NULL, refresh_failures = 0, next_refresh_at = NULL, lease_owner = NULL, \
             lease_until = NULL, version = version + 1, updated_at = ? WHERE id = ? AND version = ?",
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await.during(OPERATION)?;
            let stored = sqlx::query(sql)
                .bind(&pair.tokens.access_token.ciphertext)
                .bind(&pair.tokens.refresh_token.ciphertext)
                .bind(&pair.tokens.access_token.key_id)
                .bind(pair.expires_at)
                .bind(pair.refresh_expires_at)
                .bind(pair.issued_at)
                .bind(pair.issued_at)
                .bind(pair.issued_at)
                .bind(id)
                .bind(version)
                .execute(&mut *tx)
                .await
                .during(OPERATION)?
                .rows_affected()
                == 1;
            if stored {
                write_records!(self, tx, records, None::<i64>, pair.issued_at, OPERATION);
            }
            tx.commit().await.during(OPERATION)?;
            Ok(stored)
        })
    }

    /// Notes a failed refresh, schedules the next try, and releases the lease (if still ours);
    /// `records` (the failure happened either way) in the same transaction.
    pub async fn record_refresh_failure(
        &self,
        id: i64,
        owner: &str,
        error: &str,
        retry_at: Timestamp,
        now: Timestamp,
        records: &Records<'_>,
    ) -> Result<(), StoreError> {
        const OPERATION: &str = "recording the refresh failure";
        let sql = self.sql(
            "UPDATE amocrm_tokens SET last_error = ?, refresh_failures = refresh_failures + 1, \
             next_refresh_at = ?, lease_owner = NULL, lease_until = NULL, updated_at = ? \
             WHERE id = ? AND lease_owner = ?",
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await.during(OPERATION)?;
            sqlx::query(sql)
                .bind(error)
                .bind(retry_at)
                .bind(now)
                .bind(id)
                .bind(owner)
                .execute(&mut *tx)
                .await
                .during(OPERATION)?;
            write_records!(self, tx, records, None::<i64>, now, OPERATION);
            tx.commit().await.during(OPERATION)
        })
    }

    /// Marks the connection as needing a new install, unless the pair changed since
    /// `version` (then a newer token exists and nothing is wrong). Never deletes the row.
    /// `records` are written with the mark, in its transaction, or not at all.
    pub async fn mark_needs_reauth(
        &self,
        id: i64,
        version: i64,
        error: &str,
        now: Timestamp,
        records: &Records<'_>,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "marking the connection as needing a new install";
        let sql = self.sql(
            "UPDATE amocrm_tokens SET status = 'needs_reauth', last_error = ?, lease_owner = NULL, \
             lease_until = NULL, updated_at = ? WHERE id = ? AND version = ?",
        );
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await.during(OPERATION)?;
            let marked = sqlx::query(sql)
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(version)
                .execute(&mut *tx)
                .await
                .during(OPERATION)?
                .rows_affected()
                == 1;
            if marked {
                write_records!(self, tx, records, None::<i64>, now, OPERATION);
            }
            tx.commit().await.during(OPERATION)?;
            Ok(marked)
        })
    }

    /// Replaces the sealed pair with the same tokens sealed under another key, if the pair
    /// did not change since `version` was read. The version stays: the tokens are the same.
    pub async fn reseal(
        &self,
        id: i64,
        version: i64,
        pair: &SealedPair,
    ) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE amocrm_tokens SET access_token = ?, refresh_token = ?, key_id = ? \
             WHERE id = ? AND version = ?",
        );
        on_pool!(self, pool => sqlx::query(sql)
            .bind(&pair.access_token.ciphertext)
            .bind(&pair.refresh_token.ciphertext)
            .bind(&pair.access_token.key_id)
            .bind(id)
            .bind(version)
            .execute(pool)
            .await
            .map(|done| done.rows_affected() == 1))
        .during("re-sealing the tokens")
    }

    /// Points the connection at the account's new host after a subdomain rename.
    pub async fn update_host(
        &self,
        id: i64,
        domain: &str,
        subdomain: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let sql = self
            .sql("UPDATE amocrm_tokens SET domain = ?, subdomain = ?, updated_at = ? WHERE id = ?");
        on_pool!(self, pool => sqlx::query(sql)
            .bind(domain)
            .bind(subdomain)
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
            .map(drop))
        .during("saving the account's new host")
    }

    /// Wipes the token material and marks the connection `disconnected`, with `records` in
    /// the same transaction. False when there was nothing to do (unknown, already
    /// disconnected, or for `Unchanged` a pair that changed since): then nothing is written.
    pub async fn disconnect(
        &self,
        platform: Platform,
        account_id: i64,
        how: Disconnect,
        now: Timestamp,
        records: &Records<'_>,
    ) -> Result<bool, StoreError> {
        const OPERATION: &str = "disconnecting the account";
        let sql = self.sql(match how {
            Disconnect::Unchanged { .. } => DISCONNECT_UNCHANGED,
            Disconnect::ByAdmin => DISCONNECT_BY_ADMIN,
        });
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await.during(OPERATION)?;
            let query = sqlx::query(sql)
                .bind(now)
                .bind(account_id)
                .bind(platform.as_str());
            let query = match how {
                Disconnect::Unchanged { version } => query.bind(version),
                Disconnect::ByAdmin => query,
            };
            let disconnected =
                query.execute(&mut *tx).await.during(OPERATION)?.rows_affected() == 1;
            if disconnected {
                write_records!(self, tx, records, Some(account_id), now, OPERATION);
            }
            tx.commit().await.during(OPERATION)?;
            Ok(disconnected)
        })
    }

    /// How many connections each platform has in each status: (platform, status, count).
    pub async fn connection_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let sql = self.sql(
            "SELECT platform, status, COUNT(*) FROM amocrm_tokens GROUP BY platform, status \
             ORDER BY platform, status",
        );
        on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
            .during("counting connections")
    }

    /// When the first active access token expires.
    pub async fn earliest_expiry(&self) -> Result<Option<Timestamp>, StoreError> {
        let sql = self.sql("SELECT MIN(expires_at) FROM amocrm_tokens WHERE status = 'active'");
        on_pool!(self, pool => sqlx::query_scalar(sql).fetch_one(pool).await)
            .during("finding the earliest expiry")
    }

    /// Ids of the keys that sealed stored tokens, with how many rows each sealed.
    pub async fn key_ids_in_use(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let sql = self.sql(
            "SELECT key_id, COUNT(*) AS n FROM amocrm_tokens WHERE key_id IS NOT NULL GROUP BY key_id",
        );
        on_pool!(self, pool => sqlx::query_as(sql).fetch_all(pool).await)
            .during("checking which keys sealed the tokens")
    }
}

/// A connection with the stored hash of the presented API key (`keyed_connection!`).
#[derive(Clone, sqlx::FromRow)]
struct KeyedConnection {
    #[sqlx(flatten)]
    connection: StoredConnection,
    key_hash: Option<String>,
}

/// A row as the database returns it, before the sealed columns are paired with their key.
#[derive(Clone, sqlx::FromRow)]
struct StoredConnection {
    id: i64,
    platform: Platform,
    account_id: Option<i64>,
    external_id: Option<String>,
    account_name: Option<String>,
    domain: String,
    subdomain: String,
    access_token: Option<String>,
    refresh_token: Option<String>,
    key_id: Option<String>,
    expires_at: Timestamp,
    refresh_expires_at: Timestamp,
    issued_at: Timestamp,
    status: ConnectionStatus,
    raw: Option<String>,
    last_refresh_at: Option<Timestamp>,
    last_error: Option<String>,
    refresh_failures: i64,
    next_refresh_at: Option<Timestamp>,
    lease_owner: Option<String>,
    lease_until: Option<Timestamp>,
    version: i64,
    created_at: Timestamp,
    updated_at: Timestamp,
}

/// `kommo:31337001` → (Kommo, `31337001`); a bare account → (any platform, it); `None` for
/// an unknown platform, which names no connection.
fn qualified(account: &str) -> Option<(Option<Platform>, &str)> {
    match account.split_once(':') {
        Some((platform, rest)) => Some((Some(Platform::parse(platform)?), rest)),
        None => Some((None, account)),
    }
}

/// The first row of each platform (of `platform` only, when given), oldest first.
fn first_per_platform(
    platform: Option<Platform>,
    mut rows: Vec<StoredConnection>,
) -> Vec<ConnectionRow> {
    rows.sort_by_key(|row| row.id);
    let mut found: Vec<ConnectionRow> = Vec::new();
    for row in rows.into_iter().map(ConnectionRow::from) {
        let wanted = platform.is_none_or(|platform| row.platform == platform);
        if wanted && found.iter().all(|seen| seen.platform != row.platform) {
            found.push(row);
        }
    }
    found
}

impl StoredConnection {
    /// A row of `connection_columns!` from SQLite's inline path.
    fn from_sqlite(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: row.get(0)?,
            account_id: row.get(1)?,
            external_id: row.get(2)?,
            account_name: row.get(3)?,
            domain: row.get(4)?,
            subdomain: row.get(5)?,
            access_token: row.get(6)?,
            refresh_token: row.get(7)?,
            key_id: row.get(8)?,
            expires_at: super::inline::timestamp(row, 9)?,
            refresh_expires_at: super::inline::timestamp(row, 10)?,
            issued_at: super::inline::timestamp(row, 11)?,
            status: super::inline::named_value(row, 12)?,
            raw: row.get(13)?,
            last_refresh_at: super::inline::optional_timestamp(row, 14)?,
            last_error: row.get(15)?,
            refresh_failures: row.get(16)?,
            next_refresh_at: super::inline::optional_timestamp(row, 17)?,
            lease_owner: row.get(18)?,
            lease_until: super::inline::optional_timestamp(row, 19)?,
            version: row.get(20)?,
            created_at: super::inline::timestamp(row, 21)?,
            updated_at: super::inline::timestamp(row, 22)?,
            platform: super::inline::named_value(row, 23)?,
        })
    }
}

impl From<StoredConnection> for ConnectionRow {
    fn from(row: StoredConnection) -> Self {
        let sealed = |ciphertext: Option<String>| {
            Some(Sealed {
                key_id: row.key_id.clone()?,
                ciphertext: ciphertext?,
            })
        };
        Self {
            access_token: sealed(row.access_token),
            refresh_token: sealed(row.refresh_token),
            id: row.id,
            platform: row.platform,
            account_id: row.account_id,
            external_id: row.external_id,
            account_name: row.account_name,
            domain: row.domain,
            subdomain: row.subdomain,
            expires_at: row.expires_at,
            refresh_expires_at: row.refresh_expires_at,
            issued_at: row.issued_at,
            status: row.status,
            raw: row.raw,
            last_refresh_at: row.last_refresh_at,
            last_error: row.last_error,
            refresh_failures: row.refresh_failures,
            next_refresh_at: row.next_refresh_at,
            lease_owner: row.lease_owner,
            lease_until: row.lease_until,
            version: row.version,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}
