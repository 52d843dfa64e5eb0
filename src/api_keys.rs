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

/// True when `presented` is an active key.
pub async fn verify(store: &Store, presented: &str) -> Result<bool, StoreError> {
    let Some((key_id, secret)) = presented
        .strip_prefix("ak_")
        .and_then(|rest| rest.split_once('_'))
    else {
        return Ok(false);
    };
    if key_id.len() != 16 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(false);
    }
    Ok(match store.active_api_key_hash(key_id).await? {
        Some(stored) => constant_time_eq(&sha256_hex(secret), &stored),
        None => false,
    })
}
