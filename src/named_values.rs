//! `named_values!`: enums of stable snake_case names (statuses, reasons, outcomes) that
//! metrics, the audit trail and pages share.

/// Declares an enum of stable snake_case names with `as_str` and `ALL` made from one list, so no
/// value can exist that `ALL` lacks (metrics pre-register label values from `ALL`).
macro_rules! named_values {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident => $value:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        $vis enum $name { $($(#[$variant_meta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            // Some lists are read only by tests (metrics' label checks).
            #[allow(dead_code)]
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value's stable name, as stored and shown.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $value),+
                }
            }
        }

        /// A value read back from the database; one this build does not know is an error
        /// naming the value, never a panic.
        impl TryFrom<String> for $name {
            type Error = $crate::named_values::UnknownValue;

            fn try_from(value: String) -> Result<Self, $crate::named_values::UnknownValue> {
                match value.as_str() {
                    $($value => Ok(Self::$variant),)+
                    _ => Err($crate::named_values::UnknownValue {
                        of: stringify!($name),
                        value,
                    }),
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

/// A stored name that none of the enum's values has (a newer version wrote it, or a hand edit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a known {of}")]
pub struct UnknownValue {
    pub of: &'static str,
    pub value: String,
}
