//! amoCRM and Kommo: separate platforms with separate servers and integration registrations
//! (a client id registered on one does not exist on the other).

crate::named_values::named_values! {
    /// Which platform an integration, a state or a connection belongs to; stored as `amocrm`
    /// or `kommo`.
    #[derive(serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Platform {
        /// amoCRM, accounts on `amocrm.ru` (and `amocrm.com` for old ones).
        Amocrm => "amocrm",
        /// Kommo, accounts on `kommo.com`.
        Kommo => "kommo",
    }
}

/// amoCRM: what everything was before Kommo had its own integration (rows, sealed results).
impl Default for Platform {
    fn default() -> Self {
        Self::Amocrm
    }
}

impl Platform {
    /// The platform's account domains by default: amoCRM `amocrm.ru`, `amocrm.com`; Kommo
    /// `kommo.com`.
    pub fn default_domains(self) -> &'static [&'static str] {
        match self {
            Self::Amocrm => &["amocrm.ru", "amocrm.com"],
            Self::Kommo => &["kommo.com"],
        }
    }

    /// The host of the platform's consent page: `www.amocrm.ru` or `www.kommo.com`.
    pub fn consent_host(self) -> &'static str {
        match self {
            Self::Amocrm => "www.amocrm.ru",
            Self::Kommo => "www.kommo.com",
        }
    }

    /// The platform's name as people read it: `amoCRM` or `Kommo`.
    pub fn title(self) -> &'static str {
        match self {
            Self::Amocrm => "amoCRM",
            Self::Kommo => "Kommo",
        }
    }

    /// The platform named by a query parameter or a qualified account (`amocrm`, `kommo`).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.as_str() == name)
    }

    /// The platform an account host's domain belongs to: `kommo.com` is Kommo, anything
    /// else amoCRM (the seed's tables held both).
    pub fn of_domain(host: &str) -> Self {
        if host == "kommo.com" || host.ends_with(".kommo.com") {
            Self::Kommo
        } else {
            Self::Amocrm
        }
    }
}
