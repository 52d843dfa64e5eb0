#![doc = include_str!("lib.md")]
#![deny(missing_docs)]

pub mod amocrm;
mod api_keys;
mod cli;
mod config;
mod crypto;
mod embed;
mod events;
mod flow;
mod gateway;
mod http;
mod import;
mod integrations;
mod keys;
mod log_safe;
mod metrics;
mod named_values;
mod parts;
pub mod sandbox;
mod server;
mod store;
mod tokens;

pub use amocrm::Secret;
pub use embed::{AccessToken, Amoauth, AmoauthBuilder, DatabasePool};
pub use server::Background;
pub use tokens::TokenError;

/// What the `amoauth` binary and the crate's own integration tests use. Not public API: it
/// is outside semver and may change in any release.
#[doc(hidden)]
pub mod internal {
    #![allow(missing_docs)]
    pub use crate::amocrm::Platform;
    pub use crate::api_keys::create as create_api_key;
    pub use crate::cli::run;
    pub use crate::config::{DatabaseUrl, Settings};
    pub use crate::crypto::{Cipher, Sealed, SealedPair, TokenColumn, key_id, sha256_hex};
    pub use crate::gateway::{MAX_RETRIES as GATEWAY_MAX_RETRIES, circuit::BURST as CIRCUIT_BURST};
    pub use crate::http::new_login_link;
    pub use crate::parts::Keyed;
    pub use crate::server::{Running, start_with_listener};
    pub use crate::store::{
        Attempt, AttemptKind, Disconnect, NewConnection, NewEvent, Outcome, Records, Reservation,
        Saved, Store, now,
    };
}
