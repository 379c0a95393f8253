//! Values that remember where in a YAML file they came from, so a check that runs after
//! parsing (across resources) can still point at `file:line:column`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::ops::Deref;

/// A value with its 1-based line and column in the source document, when it came from YAML.
/// Equality and hashing look at the value only; serialization writes the value only.
#[derive(Clone, Debug)]
pub struct Located<T> {
    pub value: T,
    pub(crate) at: Option<(u32, u32)>,
}

impl<T> Located<T> {
    pub fn new(value: T) -> Located<T> {
        Located { value, at: None }
    }

    /// Line and column within the document it was parsed from.
    pub fn position(&self) -> Option<(u32, u32)> {
        self.at
    }
}

impl<T> Deref for Located<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<T: Eq> Eq for Located<T> {}

impl<T: Serialize> Serialize for Located<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(d)?;
        let loc = spanned.referenced;
        let at = (loc.line() > 0).then(|| (loc.line() as u32, loc.column() as u32));
        Ok(Located {
            value: spanned.value,
            at,
        })
    }
}
