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

impl<K, V> Located<std::collections::BTreeMap<K, V>> {
    /// For `skip_serializing_if`: an empty map is not written.
    pub fn is_empty_map(&self) -> bool {
        self.value.is_empty()
    }
}

impl<T: Default> Default for Located<T> {
    fn default() -> Self {
        Located::new(T::default())
    }
}

/// For an optional field whose presence matters even when empty: `field: null` (or an empty
/// value) reads as `Some` of the default, never as the field left out. Used with
/// `#[serde(default, deserialize_with = "…")]`, so a missing field is still `None`.
pub(crate) fn given<'de, D, T>(d: D) -> Result<Option<Located<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    let v = Located::<MapOrNull<T>>::deserialize(d)?;
    Ok(Some(Located {
        value: v.value.0.unwrap_or_default(),
        at: v.at,
    }))
}

/// A mapping that may also be written `null`. (`Option<T>` would do for YAML, but not inside
/// the span wrapper when the wire's JSON is read.)
struct MapOrNull<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOrNull<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = MapOrNull<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(MapOrNull(None))
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(MapOrNull(None))
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                T::deserialize(d).map(|v| MapOrNull(Some(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|v| MapOrNull(Some(v)))
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
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
