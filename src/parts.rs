//! The parts of amoauth, built in one place for `serve`, `demo`, every command and the
//! embedding API: the store, the keys, the amoCRM and Kommo clients, metrics, events, the OAuth flow
//! and the token service. A command takes the stage it needs: the store alone, the store
//! with its keys, or every part.

use std::sync::Arc;

use crate::config::{ServerConfig, StoreConfig};
use crate::crypto::Cipher;
use crate::events::Events;
use crate::flow::Flow;
use crate::gateway::Gateway;
use crate::integrations::Integrations;
use crate::keys::open_cipher;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tokens::TokenService;

/// Opens and migrates the database: for commands that never open a token.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database_url).await?;
    store.migrate().await?;
    Ok(store)
}

/// The database with the keys that seal its tokens: for commands that open or seal tokens
/// but never call amoCRM.
#[doc(hidden)]
pub struct Keyed {
    pub store: Store,
    pub cipher: Cipher,
}

#[doc(hidden)]
impl Keyed {
    /// Opens the database, then its keys (`keys::open_cipher`).
    pub async fn open(config: &StoreConfig) -> anyhow::Result<Self> {
        Self::with_store(config, open_store(config).await?).await
    }

    /// The keys of a database already opened and migrated.
    pub async fn with_store(config: &StoreConfig, store: Store) -> anyhow::Result<Self> {
        let cipher = open_cipher(config, &store).await?;
        Ok(Self { store, cipher })
    }
}

/// Every part, wired once.
#[derive(Clone)]
pub struct Parts {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub flow: Arc<Flow>,
    pub tokens: Arc<TokenService>,
    pub gateway: Arc<Gateway>,
}

impl Parts {
    /// Opens the database and its keys, and builds the rest from `config`.
    pub async fn open(config: &ServerConfig) -> anyhow::Result<Self> {
        Ok(Self::from_keyed(config, Keyed::open(&config.store).await?))
    }

    /// Builds every part around an opened database and its keys.
    pub fn from_keyed(config: &ServerConfig, keyed: Keyed) -> Self {
        let Keyed { store, cipher } = keyed;
        let cipher = Arc::new(cipher);
        let integrations = Arc::new(Integrations::new(&config.integrations));
        let metrics = Arc::new(Metrics::default());
        let events = Arc::new(Events::new(
            store.clone(),
            config.events.clone(),
            Arc::clone(&metrics),
        ));
        let flow = Arc::new(Flow::new(
            store.clone(),
            Arc::clone(&integrations),
            Arc::clone(&cipher),
            config.state_ttl,
            config.widget_installs,
            config.return_origins.clone(),
            Arc::clone(&events),
        ));
        let tokens = Arc::new(TokenService::new(
            store.clone(),
            Arc::clone(&integrations),
            Arc::clone(&cipher),
            config.refresh.lease,
            Arc::clone(&metrics),
            Arc::clone(&events),
        ));
        let gateway = Arc::new(Gateway::new(
            store.clone(),
            Arc::clone(&tokens),
            integrations,
            Arc::clone(&metrics),
            Arc::clone(&events),
            config.gateway,
        ));
        Self {
            store,
            metrics,
            events,
            flow,
            tokens,
            gateway,
        }
    }
}
