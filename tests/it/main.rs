//! The integration suite: one binary, real sockets, real databases.
//!
//! Scenarios run on SQLite always, and on PostgreSQL and MySQL/MariaDB when
//! `AMOAUTH_TEST_POSTGRES_URL` and `AMOAUTH_TEST_MYSQL_URL` are set (see README). Without them,
//! build.rs sets `amoauth_lacks_postgres` / `amoauth_lacks_mysql` and those variants show as
//! ignored, never as passed.

/// Makes one test per backend for each scenario `async fn name(backend: Backend)`.
macro_rules! on_all_backends {
    ($($scenario:ident),+ $(,)?) => {$(
        mod $scenario {
            use crate::support::Backend;

            #[tokio::test]
            async fn sqlite() {
                super::$scenario(Backend::Sqlite).await;
            }

            #[tokio::test]
            #[cfg_attr(amoauth_lacks_postgres, ignore = "set AMOAUTH_TEST_POSTGRES_URL")]
            async fn postgres() {
                super::$scenario(Backend::postgres()).await;
            }

            #[tokio::test]
            #[cfg_attr(amoauth_lacks_mysql, ignore = "set AMOAUTH_TEST_MYSQL_URL")]
            async fn mysql() {
                super::$scenario(Backend::mysql()).await;
            }
        }
    )+};
}

mod amocrm_client;
mod backends;
mod browser;
mod cli;
mod cli_help;
mod contract;
mod events;
mod examples_client;
mod examples_embed;
mod faults;
mod flow;
mod flow_security;
mod gateway;
mod host_app;
mod hostile;
mod hot_path;
mod http_security;
mod import;
mod keys;
mod logs;
mod metrics;
mod php;
mod platforms;
mod proxy;
mod refresh;
mod result_page;
mod retention;
mod sandbox_api;
mod secrets_on_failures;
mod security;
mod store_integrity;
mod support;
mod token_service;
