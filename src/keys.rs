//! The keys that seal the tokens, in one place: where they come from (the configuration or a
//! key file beside a SQLite database), the check that every stored token has its key, the
//! re-seal, the rotation, and opening a stored connection's token.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;

use crate::config::{Secret, StoreConfig, decode_keys};
use crate::crypto::{Cipher, Sealed, TokenColumn, generate_key, key_id};
use crate::store::{ConnectionRow, Store};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a stored token cannot be opened; says which, never the token.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the {0} is missing")]
    Missing(TokenColumn),
    #[error("the connection has no account id")]
    NoAccount,
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

/// Opens the connection's token in `column`, sealed for its own account.
pub fn open_token(
    cipher: &Cipher,
    row: &ConnectionRow,
    column: TokenColumn,
) -> Result<Secret, OpenError> {
    let sealed = match column {
        TokenColumn::AccessToken => row.access_token.as_ref(),
        TokenColumn::RefreshToken => row.refresh_token.as_ref(),
    }
    .ok_or(OpenError::Missing(column))?;
    let account_id = row.account_id.ok_or(OpenError::NoAccount)?;
    Ok(cipher.open_token(sealed, column, account_id)?)
}

/// Where the SQLite database keeps its key file: `<database file>.key`.
pub fn key_file(config: &StoreConfig) -> Option<PathBuf> {
    config.database_url.sqlite_path().map(|path| {
        let mut name = path.into_os_string();
        name.push(".key");
        PathBuf::from(name)
    })
}

/// Loads the keys that seal the tokens (creating a key file beside a new SQLite database)
/// and refuses to start when a stored token was sealed with a key that is not configured:
/// a wrong key is a clear error, never garbage tokens. Then re-seals, once, the tokens
/// sealed before they were bound to their account.
pub async fn open_cipher(config: &StoreConfig, store: &Store) -> anyhow::Result<Cipher> {
    let keys = load_or_create_keys(config.encryption_key.as_ref(), key_file(config).as_deref())?;
    let cipher = Cipher::from_keys(&keys);
    for (key_id, rows) in store.key_ids_in_use().await? {
        if !cipher.knows(&key_id) {
            anyhow::bail!(
                "AMOAUTH_ENCRYPTION_KEY: {rows} stored connection(s) were sealed with key id {key_id}, \
                 which is not among the configured keys (ids {}); configure the key that sealed them",
                cipher.key_ids().join(", ")
            );
        }
    }
    let resealed = reseal(store, &cipher, |sealed| !sealed.is_account_bound()).await?;
    if resealed.count > 0 {
        tracing::info!(
            connections = resealed.count,
            "re-sealed stored tokens to bind each to its account"
        );
    }
    if resealed.left > 0 {
        tracing::warn!(
            connections = resealed.left,
            "tokens are still sealed in the earlier format (a replica of an older version is \
             writing them); they are refused until a restart re-seals them"
        );
    }
    Ok(cipher)
}

/// What a re-seal did.
pub struct Resealed {
    /// Connections re-sealed by this process.
    pub count: u64,
    /// Connections that were still stale after every pass (another process kept writing).
    pub left: u64,
}

/// Passes over the connections: a row written meanwhile (its version changed) is read again
/// and re-sealed in the next pass.
const RESEAL_PASSES: u32 = 5;

/// Re-seals with the cipher's writing key, bound to its account, every stored pair for which
/// `stale` holds. Each write is version-checked, so a refresh (or another process re-sealing)
/// in between is never overwritten: such a row is read again and done in the next pass.
pub async fn reseal(
    store: &Store,
    cipher: &Cipher,
    stale: impl Fn(&Sealed) -> bool,
) -> anyhow::Result<Resealed> {
    // A row re-sealed twice (a writer put the old key back in between) counts once.
    let (mut resealed, mut pass) = (std::collections::HashSet::new(), 0);
    loop {
        let rows: Vec<ConnectionRow> = store
            .connections()
            .await?
            .into_iter()
            .filter(|row| {
                row.access_token
                    .iter()
                    .chain(&row.refresh_token)
                    .any(&stale)
            })
            .collect();
        if rows.is_empty() || pass == RESEAL_PASSES {
            return Ok(Resealed {
                count: resealed.len() as u64,
                left: rows.len() as u64,
            });
        }
        if pass > 0 {
            tokio::time::sleep(Duration::from_millis(100 << pass)).await;
        }
        pass += 1;
        for row in rows {
            if reseal_row(store, cipher, &row).await? {
                resealed.insert(row.id);
            }
        }
    }
}

/// Re-seals one connection's pair with the writing key; false when the row changed since it
/// was read.
async fn reseal_row(store: &Store, cipher: &Cipher, row: &ConnectionRow) -> anyhow::Result<bool> {
    let (Some(access), Some(refresh)) = (&row.access_token, &row.refresh_token) else {
        return Ok(false);
    };
    let account_id = row
        .account_id
        .ok_or_else(|| anyhow::anyhow!("connection {} has tokens but no account id", row.id))?;
    let open = |sealed: &Sealed, column| {
        if sealed.is_account_bound() {
            cipher.open_token(sealed, column, account_id)
        } else {
            cipher.open_unbound_token(sealed, column)
        }
        .with_context(|| format!("cannot re-seal the {column} of account {account_id}"))
    };
    let pair = cipher.seal_pair(
        &open(access, TokenColumn::AccessToken)?,
        &open(refresh, TokenColumn::RefreshToken)?,
        account_id,
    );
    Ok(store.reseal(row.id, row.version, &pair).await?)
}

/// Loads the keys (the writing one first) from `AMOAUTH_ENCRYPTION_KEY`, or from (creating
/// it if needed) a key file with mode 0600; both hold comma-separated base64 keys.
pub fn load_or_create_keys(
    configured: Option<&Secret>,
    key_file: Option<&Path>,
) -> anyhow::Result<Vec<[u8; 32]>> {
    if let Some(keys) = configured {
        return Ok(decode_keys(keys.expose())?);
    }
    let Some(path) = key_file else {
        anyhow::bail!(
            "AMOAUTH_ENCRYPTION_KEY: is required for this database (generate one with `openssl rand -base64 32`)"
        );
    };
    let read = |path: &Path| -> anyhow::Result<Vec<[u8; 32]>> {
        let content = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        decode_keys(&content).with_context(|| {
            format!(
                "key file {} does not hold base64 32-byte keys",
                path.display()
            )
        })
    };
    if path.exists() {
        return read(path);
    }
    let key = generate_key();
    match write_private_file(path, &B64.encode(key)) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "created a new encryption key file; back it up with the database");
            Ok(vec![key])
        }
        // Another process starting at the same time created it first: use theirs.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(err) => Err(err).with_context(|| format!("cannot create key file {}", path.display())),
    }
}

/// Replaces the key file's content with `keys` (the writing one first), atomically.
pub fn rewrite_key_file(path: &Path, keys: &[[u8; 32]]) -> std::io::Result<()> {
    let content: Vec<String> = keys.iter().map(|key| B64.encode(key)).collect();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".rotating");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    write_private_file(&temporary, &content.join(","))?;
    std::fs::rename(&temporary, path)
}

/// Writes the file completely under a temporary name, then links it into place, so no
/// other process ever reads a half-written key; fails with AlreadyExists if `path` exists.
fn write_private_file(path: &Path, content: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let written = options.open(&temporary).and_then(|mut file| {
        file.write_all(content.as_bytes())?;
        file.sync_all()
    });
    let linked = written.and_then(|()| std::fs::hard_link(&temporary, path));
    let _ = std::fs::remove_file(&temporary);
    linked
}

/// What `rotate` did.
pub struct Rotated {
    /// Connections re-sealed with the new writing key.
    pub resealed: u64,
    /// The id of the key that writes from now on.
    pub write_key_id: String,
    /// The key file that was rotated, or None when the keys are configured.
    pub key_file: Option<PathBuf>,
    /// "key ids X (N connections) still seal tokens", or empty when only the writing key does.
    pub still_in_use: String,
}

/// With `AMOAUTH_ENCRYPTION_KEY="NEW,OLD"`: re-seals with NEW. With a SQLite key file:
/// adds a new key in front, re-seals, then leaves in the file only the new key and any key
/// still sealing a row (a running amoauth kept writing with it), which is never dropped.
pub async fn rotate(config: &StoreConfig, store: &Store) -> anyhow::Result<Rotated> {
    let cipher = open_cipher(config, store).await?;
    if config.encryption_key.is_some() {
        let resealed = reseal_with_write_key(store, &cipher).await?;
        return Ok(Rotated {
            resealed: resealed.count,
            write_key_id: cipher.write_key_id().to_owned(),
            key_file: None,
            still_in_use: old_keys_in_use(store, &cipher).await?,
        });
    }
    let path = key_file(config)
        .ok_or_else(|| anyhow::anyhow!("AMOAUTH_ENCRYPTION_KEY: is required for this database"))?;
    let old_keys = load_or_create_keys(None, Some(&path))?;
    let mut keys = vec![generate_key()];
    keys.extend(old_keys);
    // The old keys stay in the file until every token is re-sealed: a crash in between
    // leaves a file that still reads everything.
    rewrite_key_file(&path, &keys)
        .with_context(|| format!("cannot write key file {}", path.display()))?;
    let cipher = Cipher::from_keys(&keys);
    let resealed = reseal_with_write_key(store, &cipher).await?;
    let used: Vec<String> = store
        .key_ids_in_use()
        .await?
        .into_iter()
        .map(|(key_id, _)| key_id)
        .collect();
    let kept: Vec<[u8; 32]> = keys
        .iter()
        .enumerate()
        .filter(|(i, key)| *i == 0 || used.contains(&key_id(key)))
        .map(|(_, key)| *key)
        .collect();
    rewrite_key_file(&path, &kept)
        .with_context(|| format!("cannot write key file {}", path.display()))?;
    Ok(Rotated {
        resealed: resealed.count,
        write_key_id: cipher.write_key_id().to_owned(),
        key_file: Some(path),
        still_in_use: old_keys_in_use(store, &cipher).await?,
    })
}

/// Re-seals every token not sealed by the writing key.
async fn reseal_with_write_key(store: &Store, cipher: &Cipher) -> anyhow::Result<Resealed> {
    reseal(store, cipher, |sealed| {
        sealed.key_id != cipher.write_key_id() || !sealed.is_account_bound()
    })
    .await
}

/// "key ids X (N connections), Y (M connections) still seal tokens", or empty when only the
/// writing key does.
async fn old_keys_in_use(store: &Store, cipher: &Cipher) -> anyhow::Result<String> {
    let old: Vec<String> = store
        .key_ids_in_use()
        .await?
        .into_iter()
        .filter(|(key_id, _)| key_id != cipher.write_key_id())
        .map(|(key_id, rows)| format!("{key_id} ({rows} connections)"))
        .collect();
    if old.is_empty() {
        return Ok(String::new());
    }
    Ok(format!("key ids {} still seal tokens", old.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("amoauth.db.key");
        let first = load_or_create_keys(None, Some(&path)).unwrap();
        let second = load_or_create_keys(None, Some(&path)).unwrap();
        assert_eq!(first, second);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
