//! The integration suite: one binary, real sockets, real databases.
//!
//! Scenarios run on SQLite always, and on PostgreSQL and MySQL/MariaDB when
//! `AMOAUTH_TEST_POSTGRES_URL` and `AMOAUTH_TEST_MYSQL_URL` are set (see README).

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
            async fn postgres() {
                if let Some(backend) = Backend::postgres() {
                    super::$scenario(backend).await;
                }
            }

            #[tokio::test]
            async fn mysql() {
                if let Some(backend) = Backend::mysql() {
                    super::$scenario(backend).await;
                }
            }
        }
    )+};
}

mod backends;
mod browser;
mod cli;
mod contract;
mod events;
mod faults;
mod flow;
mod host_app;
mod hostile;
mod import;
mod keys;
mod logs;
mod proxy;
mod refresh;
mod security;
mod support;
