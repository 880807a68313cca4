//! Fields that accept more than one YAML shape. Written as visitors rather than untagged
//! enums so that a wrong shape gets a precise message, located by the YAML deserializer.

use std::fmt;
use std::path::PathBuf;

use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};

/// `train: data.jsonl` or `train: [a.jsonl, b.jsonl]`; `null` is the empty list.
pub(super) fn one_or_many_paths<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    struct Paths;
    impl<'de> Visitor<'de> for Paths {
        type Value = Vec<PathBuf>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a path or a list of paths")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            Ok(vec![PathBuf::from(s)])
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(p) = seq.next_element::<PathBuf>()? {
                out.push(p);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Paths)
}

/// A list of module names, or PEFT's `"all-linear"` for all seven projections. Names are
/// checked by validation, so a recipe built in code is checked the same way.
pub(super) fn target_modules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Modules;
    impl<'de> Visitor<'de> for Modules {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list of module names or \"all-linear\"")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            if s == "all-linear" {
                Ok(super::all_linear())
            } else {
                Err(E::invalid_value(Unexpected::Str(s), &self))
            }
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(m) = seq.next_element::<String>()? {
                out.push(m);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Modules)
}

/// `activation_checkpointing`: `false`, `true` (every layer) or `k` (layers 0, k, 2k, ...,
/// torchtune's selective checkpointing).
pub(super) mod recompute {
    use super::*;
    use crate::model::decoder::Recompute;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(r: &Recompute, s: S) -> Result<S::Ok, S::Error> {
        match *r {
            Recompute::Off => s.serialize_bool(false),
            Recompute::Every(1) => s.serialize_bool(true),
            Recompute::Every(k) => s.serialize_u64(k as u64),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Recompute, D::Error> {
        struct Every;
        impl<'de> Visitor<'de> for Every {
            type Value = Recompute;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false, or k >= 1 to recompute every k-th layer")
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(if b { Recompute::Every(1) } else { Recompute::Off })
            }
            fn visit_u64<E: de::Error>(self, k: u64) -> Result<Self::Value, E> {
                usize::try_from(k)
                    .ok()
                    .and_then(Recompute::every)
                    .ok_or_else(|| E::invalid_value(Unexpected::Unsigned(k), &self))
            }
            fn visit_i64<E: de::Error>(self, k: i64) -> Result<Self::Value, E> {
                match u64::try_from(k) {
                    Ok(k) => self.visit_u64(k),
                    Err(_) => Err(E::invalid_value(Unexpected::Signed(k), &self)),
                }
            }
        }
        d.deserialize_any(Every)
    }
}
