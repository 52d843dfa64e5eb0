//! API keys for the token API: `ak_<key id>_<secret>`; the id is public, the secret is
//! stored only as its SHA-256 and compared in constant time.

use crate::crypto::{constant_time_eq, fill_random, random_token, sha256_hex};
use crate::store::{Store, StoreError, now};

/// A freshly created key: `full` is shown once and never stored.
pub struct NewApiKey {
    pub full: String,
    pub key_id: String,
}

/// Creates a key named `name` and stores its hash.
#[doc(hidden)]
pub async fn create(store: &Store, name: &str) -> Result<NewApiKey, StoreError> {
    let mut id_bytes = [0u8; 8];
    fill_random(&mut id_bytes);
    let key_id = hex::encode(id_bytes);
    let secret = random_token();
    store
        .insert_api_key(name, &key_id, &sha256_hex(&secret), now())
        .await?;
    Ok(NewApiKey {
        full: format!("ak_{key_id}_{secret}"),
        key_id,
    })
}

/// A key as presented in `Authorization: Bearer`, split into its public id and its secret;
/// whether it is active is for the database to say.
pub struct PresentedKey<'a> {
    key_id: &'a str,
    secret: &'a str,
}

impl<'a> PresentedKey<'a> {
    /// None when `presented` cannot be a key at all.
    pub fn parse(presented: &'a str) -> Option<Self> {
        let (key_id, secret) = presented
            .strip_prefix("ak_")
            .and_then(|rest| rest.split_once('_'))?;
        if key_id.len() != 16 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self { key_id, secret })
    }

    /// The public part, by which the stored hash is found.
    pub fn key_id(&self) -> &'a str {
        self.key_id
    }

    /// True when `stored`, the hash of the active key with this id, is this secret's.
    pub fn matches(&self, stored: Option<&str>) -> bool {
        stored.is_some_and(|stored| constant_time_eq(&sha256_hex(self.secret), stored))
    }

    /// True when this is an active key.
    pub async fn is_active(&self, store: &Store) -> Result<bool, StoreError> {
        let stored = store.active_api_key_hash(self.key_id).await?;
        Ok(self.matches(stored.as_deref()))
    }
}

/// True when `presented` is an active key.
pub async fn verify(store: &Store, presented: &str) -> Result<bool, StoreError> {
    match PresentedKey::parse(presented) {
        Some(key) => key.is_active(store).await,
        None => Ok(false),
    }
}
