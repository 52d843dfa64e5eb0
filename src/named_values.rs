//! `named_values!`: enums of stable snake_case names (statuses, reasons, outcomes) that
//! metrics, the audit trail and pages share.

/// Declares an enum of stable snake_case names with `as_str` and `ALL` made from one list, so no
/// value can exist that `ALL` lacks (metrics pre-register label values from `ALL`).
macro_rules! named_values {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($variant:ident => $value:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            // Some lists are read only by tests (metrics' label checks).
            #[allow(dead_code)]
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The stable snake_case name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $value),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use named_values;
