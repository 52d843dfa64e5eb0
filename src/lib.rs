//! amoauth: connects web applications to amoCRM and Kommo accounts through OAuth 2.0.

pub mod amocrm;
pub mod api_keys;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod events;
pub mod flow;
pub mod http;
pub mod import;
pub mod keys;
pub mod log_safe;
pub mod metrics;
mod named_values;
pub mod parts;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod tokens;
