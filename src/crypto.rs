//! Token encryption at rest (XChaCha20-Poly1305), random values and hashes.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

use crate::config::Secret;

const NONCE_LEN: usize = 24;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const B64_URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Starts every token ciphertext bound to its account; `.` is not in the base64 alphabet,
/// so a ciphertext of the earlier, column-only format never starts with it.
const ACCOUNT_BOUND: &str = "v2.";

/// Seals token values. One key writes; every known key reads, so keys can be rotated
/// by adding the new one and re-encrypting.
#[doc(hidden)]
pub struct Cipher {
    write_key_id: String,
    keys: HashMap<String, XChaCha20Poly1305>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cipher(write_key_id={})", self.write_key_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("the value was sealed with key `{0}`, which is not configured")]
    UnknownKey(String),
    #[error("the value does not decrypt with key `{0}`: wrong key or corrupted data")]
    Corrupt(String),
}

crate::named_values::named_values! {
    /// The column a token is sealed for: part of what the seal authenticates.
    #[doc(hidden)]
    pub enum TokenColumn {
        AccessToken => "access_token",
        RefreshToken => "refresh_token",
    }
}

/// A connection's two tokens, sealed together with the writing key for one account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedPair {
    /// The access token, sealed for its column and account.
    pub access_token: Sealed,
    /// The refresh token, sealed for its column and account.
    pub refresh_token: Sealed,
}

/// A sealed value and the id of the key that sealed it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[doc(hidden)]
pub struct Sealed {
    pub key_id: String,
    /// base64(nonce || ciphertext+tag)
    pub ciphertext: String,
}

#[doc(hidden)]
impl Cipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self::from_keys(std::slice::from_ref(key))
    }

    /// The first key seals; all of them open, so values sealed before a rotation still read.
    pub fn from_keys(keys: &[[u8; 32]]) -> Self {
        assert!(!keys.is_empty(), "at least one key");
        Self {
            write_key_id: key_id(&keys[0]),
            keys: keys
                .iter()
                .map(|key| {
                    let aead = XChaCha20Poly1305::new_from_slice(key).expect("32-byte key");
                    (key_id(key), aead)
                })
                .collect(),
        }
    }

    /// Whether a value sealed with `key_id` can be opened.
    pub fn knows(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// The ids of every configured key, the writing one first.
    pub fn key_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .keys
            .keys()
            .filter(|id| **id != self.write_key_id)
            .cloned()
            .collect();
        ids.sort();
        ids.insert(0, self.write_key_id.clone());
        ids
    }

    pub fn write_key_id(&self) -> &str {
        &self.write_key_id
    }

    /// Seals a token for `column` of `account_id`'s connection: both are authenticated, so a
    /// value copied into another column or another account's row does not decrypt.
    pub fn seal_token(&self, plaintext: &str, column: TokenColumn, account_id: i64) -> Sealed {
        let blob = self.seal_blob(plaintext, &token_context(column, account_id));
        Sealed {
            key_id: self.write_key_id.clone(),
            ciphertext: format!("{ACCOUNT_BOUND}{}", B64.encode(blob)),
        }
    }

    /// Seals both tokens of a connection for `account_id`, each bound to its column.
    pub fn seal_pair(
        &self,
        access_token: &Secret,
        refresh_token: &Secret,
        account_id: i64,
    ) -> SealedPair {
        SealedPair {
            access_token: self.seal_token(
                access_token.expose(),
                TokenColumn::AccessToken,
                account_id,
            ),
            refresh_token: self.seal_token(
                refresh_token.expose(),
                TokenColumn::RefreshToken,
                account_id,
            ),
        }
    }

    /// Opens what `seal_token` sealed for the same column and account. A value in the
    /// earlier format (bound to its column only) is refused: see `open_unbound_token`.
    pub fn open_token(
        &self,
        sealed: &Sealed,
        column: TokenColumn,
        account_id: i64,
    ) -> Result<Secret, CryptoError> {
        let corrupt = || CryptoError::Corrupt(sealed.key_id.clone());
        let encoded = sealed
            .ciphertext
            .strip_prefix(ACCOUNT_BOUND)
            .ok_or_else(corrupt)?;
        let blob = B64.decode(encoded).map_err(|_| corrupt())?;
        self.open_blob(&sealed.key_id, &blob, &token_context(column, account_id))
    }

    /// Opens a token sealed before tokens were bound to their account (only to `column`),
    /// for the one-time re-seal at start; nothing else reads this format.
    pub fn open_unbound_token(
        &self,
        sealed: &Sealed,
        column: TokenColumn,
    ) -> Result<Secret, CryptoError> {
        let corrupt = || CryptoError::Corrupt(sealed.key_id.clone());
        let blob = B64.decode(&sealed.ciphertext).map_err(|_| corrupt())?;
        self.open_blob(&sealed.key_id, &blob, column.as_str())
    }

    /// `seal` for a URL: `<key id>.<base64url(nonce || ciphertext+tag)>`, nothing to escape.
    pub fn seal_for_url(&self, plaintext: &str, context: &str) -> String {
        let blob = self.seal_blob(plaintext, context);
        format!("{}.{}", self.write_key_id, B64_URL.encode(blob))
    }

    /// Opens what `seal_for_url` made, with any configured key.
    pub fn open_from_url(&self, token: &str, context: &str) -> Result<Secret, CryptoError> {
        let (key_id, blob) = token
            .split_once('.')
            .ok_or_else(|| CryptoError::Corrupt(String::new()))?;
        let blob = B64_URL
            .decode(blob)
            .map_err(|_| CryptoError::Corrupt(key_id.to_owned()))?;
        self.open_blob(key_id, &blob, context)
    }

    /// nonce || ciphertext+tag, with a fresh random nonce.
    fn seal_blob(&self, plaintext: &str, context: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let aead = &self.keys[&self.write_key_id];
        let ciphertext = aead
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("encryption into a Vec cannot fail");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ciphertext);
        blob
    }

    fn open_blob(&self, key_id: &str, blob: &[u8], context: &str) -> Result<Secret, CryptoError> {
        let aead = self
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        let corrupt = || CryptoError::Corrupt(key_id.to_owned());
        if blob.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let nonce = <[u8; NONCE_LEN]>::try_from(nonce).map_err(|_| corrupt())?;
        let plaintext = aead
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| corrupt())?;
        String::from_utf8(plaintext)
            .map(Secret::new)
            .map_err(|_| corrupt())
    }
}

impl Sealed {
    /// False for a token sealed before tokens were bound to their account.
    pub fn is_account_bound(&self) -> bool {
        self.ciphertext.starts_with(ACCOUNT_BOUND)
    }
}

/// The associated data of a token: its column and its account.
fn token_context(column: TokenColumn, account_id: i64) -> String {
    format!("{column}\0account_id={account_id}")
}

/// A short public id for a key: lets each row name its key without revealing it.
#[doc(hidden)]
pub fn key_id(key: &[u8; 32]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"amoauth key id\0");
    hasher.update(key);
    hex::encode(&hasher.finalize()[..4])
}

/// A new random key.
pub fn generate_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    fill_random(&mut key);
    key
}

/// Fills `buf` from the OS CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random number generator is unavailable");
}

/// A random factor in `[low, high)`, for backoffs: callers that failed together then do not
/// retry together.
pub fn jitter(low: f64, high: f64) -> f64 {
    let mut byte = [0u8; 1];
    fill_random(&mut byte);
    low + (high - low) * f64::from(byte[0]) / 256.0
}

/// 32 random bytes as 64 hex characters.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    fill_random(&mut bytes);
    hex::encode(bytes)
}

/// Lowercase hex SHA-256.
#[doc(hidden)]
pub fn sha256_hex(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Lowercase hex HMAC-SHA256, as amoCRM signs its uninstall webhook.
pub fn hmac_sha256_hex(key: &str, message: &str) -> String {
    use hmac::Mac as _;
    let mut mac = <hmac::Hmac<Sha256> as hmac::KeyInit>::new_from_slice(key.as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Compares secrets without leaking where they differ through timing.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    a.ct_eq(&b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_round_trip_and_hide_the_plaintext() {
        let cipher = Cipher::new(&[7u8; 32]);
        let sealed = cipher.seal_token("eyJ-access-token", TokenColumn::AccessToken, 5);
        assert!(!sealed.ciphertext.contains("eyJ-access-token"));
        assert!(sealed.is_account_bound());
        assert_eq!(sealed.key_id, key_id(&[7u8; 32]));
        let opened = cipher
            .open_token(&sealed, TokenColumn::AccessToken, 5)
            .unwrap();
        assert_eq!(opened.expose(), "eyJ-access-token");
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let cipher = Cipher::new(&[7u8; 32]);
        assert_ne!(
            cipher
                .seal_token("x", TokenColumn::AccessToken, 1)
                .ciphertext,
            cipher
                .seal_token("x", TokenColumn::AccessToken, 1)
                .ciphertext
        );
    }

    #[test]
    fn wrong_key_column_or_account_is_an_error_not_garbage() {
        let sealed = Cipher::new(&[1u8; 32]).seal_token("token", TokenColumn::AccessToken, 5);
        let other = Cipher::new(&[2u8; 32]);
        assert!(matches!(
            other.open_token(&sealed, TokenColumn::AccessToken, 5),
            Err(CryptoError::UnknownKey(_))
        ));
        let mut forged = sealed.clone();
        forged.key_id = other.write_key_id().to_owned();
        assert!(matches!(
            other.open_token(&forged, TokenColumn::AccessToken, 5),
            Err(CryptoError::Corrupt(_))
        ));
        let cipher = Cipher::new(&[1u8; 32]);
        for (column, account_id) in [
            (TokenColumn::RefreshToken, 5),
            (TokenColumn::AccessToken, 6),
        ] {
            assert!(matches!(
                cipher.open_token(&sealed, column, account_id),
                Err(CryptoError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn unbound_tokens_open_only_through_the_re_seal_path() {
        let cipher = Cipher::new(&[1u8; 32]);
        let unbound = Sealed {
            key_id: cipher.write_key_id().to_owned(),
            ciphertext: B64.encode(cipher.seal_blob("token", "access_token")),
        };
        assert!(!unbound.is_account_bound());
        assert!(
            cipher
                .open_token(&unbound, TokenColumn::AccessToken, 5)
                .is_err()
        );
        let opened = cipher
            .open_unbound_token(&unbound, TokenColumn::AccessToken)
            .unwrap();
        assert_eq!(opened.expose(), "token");
        // Stripping the marker does not turn a bound token into an unbound one.
        let bound = cipher.seal_token("token", TokenColumn::AccessToken, 5);
        let stripped = Sealed {
            key_id: bound.key_id.clone(),
            ciphertext: bound.ciphertext[ACCOUNT_BOUND.len()..].to_owned(),
        };
        assert!(
            cipher
                .open_unbound_token(&stripped, TokenColumn::AccessToken)
                .is_err()
        );
    }

    #[test]
    fn older_keys_still_open_what_they_sealed() {
        let sealed = Cipher::new(&[1u8; 32]).seal_token("token", TokenColumn::AccessToken, 5);
        let rotated = Cipher::from_keys(&[[2u8; 32], [1u8; 32]]);
        assert_eq!(rotated.write_key_id(), key_id(&[2u8; 32]));
        assert!(rotated.knows(&sealed.key_id));
        assert_eq!(
            rotated
                .open_token(&sealed, TokenColumn::AccessToken, 5)
                .unwrap()
                .expose(),
            "token"
        );
        assert_eq!(
            rotated.seal_token("x", TokenColumn::AccessToken, 5).key_id,
            key_id(&[2u8; 32])
        );
    }

    #[test]
    fn url_tokens_round_trip_without_characters_to_escape() {
        let cipher = Cipher::from_keys(&[[2u8; 32], [1u8; 32]]);
        let token = cipher.seal_for_url("outcome", "callback_result");
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{token}"
        );
        let opened = cipher.open_from_url(&token, "callback_result").unwrap();
        assert_eq!(opened.expose(), "outcome");
        assert!(cipher.open_from_url(&token, "access_token").is_err());
        let older = Cipher::new(&[1u8; 32]).seal_for_url("old", "c");
        assert_eq!(cipher.open_from_url(&older, "c").unwrap().expose(), "old");
        for broken in ["", "no-dot", "abcd.!!!", "abcd.AAAA"] {
            assert!(cipher.open_from_url(broken, "c").is_err(), "{broken}");
        }
    }

    #[test]
    fn hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex("Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn constant_time_eq_compares_values() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }
}
