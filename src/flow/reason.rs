//! Why a callback failed, as one closed list: the audit row's `reason`, the page's reason code
//! and the `reason` label of `amoauth_flows_failed_total`.

use crate::amocrm::AmoFailure;

crate::named_values::named_values! {
    /// Why a callback failed: the audit row's `reason`, the page's reason code and the
    /// `reason` label of `amoauth_flows_failed_total`.
    pub enum CallbackReason {
        AccessDenied => "access_denied",
        AmoCrmCallbackError => "amocrm_callback_error",
        InvalidRequest => "invalid_request",
        BadReferer => "bad_referer",
        RefererMismatch => "referer_mismatch",
        AccountTaken => "account_taken",
        UnknownState => "unknown_state",
        UsedState => "used_state",
        ExpiredState => "expired_state",
        WidgetInstallsOff => "widget_installs_off",
        AmoCrmRejected => "amocrm_rejected",
        AmoCrmError => "amocrm_error",
        AmoCrmTimeout => "amocrm_timeout",
        AmoCrmUnreachable => "amocrm_unreachable",
        AmoCrmBadResponse => "amocrm_bad_response",
        DatabaseError => "database_error",
    }
}

impl From<AmoFailure> for CallbackReason {
    fn from(failure: AmoFailure) -> Self {
        match failure {
            AmoFailure::Rejected => Self::AmoCrmRejected,
            AmoFailure::Error => Self::AmoCrmError,
            AmoFailure::Timeout => Self::AmoCrmTimeout,
            AmoFailure::Unreachable => Self::AmoCrmUnreachable,
            AmoFailure::BadResponse => Self::AmoCrmBadResponse,
        }
    }
}
