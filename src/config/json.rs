//! Reading `config.json`: the JSON object (a key given twice is an error), its values' types,
//! and the resolution of every key against the tensor shapes ([`Inferred`]) and the defaults,
//! each value's [`Origin`] recorded.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::{Config, Inferred, KernelFn, Origin, TokenizerKind, KNOWN_KEYS, MAX_DEPTH};
use crate::error::{Error, Result};

fn get_usize(map: &Map<String, Value>, key: &str) -> Result<Option<usize>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| {
                Error::Config(format!("`{key}` must be a non-negative integer, found {v}"))
            }),
    }
}

fn get_bool(map: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::Config(format!(
            "`{key}` must be true or false, found {v}"
        ))),
    }
}

fn get_f32(map: &Map<String, Value>, key: &str) -> Result<Option<f32>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x as f32)),
            _ => Err(Error::Config(format!(
                "`{key}` must be a finite non-negative number, found {v}"
            ))),
        },
    }
}

/// Resolves one key: the config's value, else the inferred one, else the default; a config value
/// that contradicts an inferred one is an error naming both.
struct Resolver<'a> {
    origins: BTreeMap<&'static str, Origin>,
    map: &'a Map<String, Value>,
}

impl Resolver<'_> {
    fn pick<T: PartialEq + fmt::Debug + Copy>(
        &mut self,
        key: &'static str,
        given: Option<T>,
        inferred: Option<T>,
        default: Option<T>,
    ) -> Result<T> {
        match (given, inferred) {
            (Some(g), Some(i)) if g != i => Err(Error::ConfigMismatch {
                key: key.into(),
                config: format!("{g:?}"),
                weights: format!("{i:?}"),
            }),
            (Some(g), _) => {
                self.origins.insert(key, Origin::Config);
                Ok(g)
            }
            (None, Some(i)) => {
                self.origins.insert(key, Origin::Inferred);
                Ok(i)
            }
            (None, None) => match default {
                Some(d) => {
                    self.origins.insert(key, Origin::Default);
                    Ok(d)
                }
                None => Err(Error::Config(format!(
                    "`{key}` is required: it has no default and the weights do not determine it"
                ))),
            },
        }
    }

    fn usize(
        &mut self,
        key: &'static str,
        inferred: Option<usize>,
        default: Option<usize>,
    ) -> Result<usize> {
        let given = get_usize(self.map, key)?;
        self.pick(key, given, inferred, default)
    }

    fn bool(&mut self, key: &'static str, inferred: Option<bool>, default: bool) -> Result<bool> {
        let given = get_bool(self.map, key)?;
        self.pick(key, given, inferred, Some(default))
    }
}

/// Message prefixes of the errors [`TopLevel`]'s visitor raises.
const DUPLICATE: &str = "duplicate key ";
const NOT_OBJECT: &str = "invalid type";

/// The top-level object of `config.json`, refusing a key given twice (serde_json's `Value`
/// silently keeps the last).
struct TopLevel(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TopLevel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> std::result::Result<TopLevel, A::Error> {
                let mut map = Map::new();
                while let Some((key, value)) = access.next_entry::<String, Value>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("{DUPLICATE}`{key}`")));
                    }
                    map.insert(key, value);
                }
                Ok(TopLevel(map))
            }
        }
        d.deserialize_map(Visitor)
    }
}

impl Config {
    /// Parses `config.json` text and resolves it against what the weights imply.
    ///
    /// Use [`Inferred::default()`] when no weights are at hand: then every required key
    /// (`num_tokens`, `max_seq_len`, `dim`, `depth`, `heads`) must be present.
    ///
    /// ```
    /// use performer::config::{Config, Inferred};
    /// let json = r#"{"num_tokens": 256, "max_seq_len": 128, "dim": 64, "depth": 2,
    ///               "heads": 2, "dim_head": 32, "causal": true}"#;
    /// let config = Config::from_json(json, &Inferred::default()).unwrap();
    /// assert_eq!(config.nb_features, 110); // int(32 · ln 32), performer-pytorch's default
    /// assert!(Config::from_json(r#"{"dimm": 3}"#, &Inferred::default()).is_err());
    /// ```
    ///
    /// A UTF-8 byte order mark at the start is skipped. A key given twice is an
    /// [`Error::Config`] naming the key (JSON parsers disagree on which one wins).
    pub fn from_json(text: &str, inferred: &Inferred) -> Result<Self> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let TopLevel(map) = serde_json::from_str(text).map_err(|e| {
            let msg = e.to_string();
            match msg.strip_prefix(DUPLICATE) {
                Some(rest) => Error::Config(format!(
                    "duplicate key {}",
                    rest.split(" at line").next().unwrap_or(rest)
                )),
                None if msg.starts_with(NOT_OBJECT) => {
                    Error::Config("the top level must be a JSON object".into())
                }
                None => Error::Config(format!("invalid JSON: {e}")),
            }
        })?;
        Self::from_map(&map, inferred)
    }

    /// Resolves a config from the weights alone (no `config.json`): every key the tensors
    /// determine is inferred, everything else takes its default, and `causal` is assumed.
    pub fn from_inferred(inferred: &Inferred) -> Result<Self> {
        let mut map = Map::new();
        map.insert("causal".into(), Value::Bool(true));
        let mut config = Self::from_map(&map, inferred)?;
        config.origins.insert("causal", Origin::Default);
        Ok(config)
    }

    fn from_map(map: &Map<String, Value>, inf: &Inferred) -> Result<Self> {
        if let Some(key) = map.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(Error::UnknownConfigKey { key: key.clone() });
        }
        let mut r = Resolver {
            origins: BTreeMap::new(),
            map,
        };
        let num_tokens = r.usize("num_tokens", inf.num_tokens, None)?;
        let max_seq_len = r.usize("max_seq_len", inf.max_seq_len, None)?;
        let dim = r.usize("dim", inf.dim, None)?;
        let depth = r.usize("depth", inf.depth, None)?;
        // Bounded before anything is sized by it (a per-layer list follows).
        if depth > MAX_DEPTH {
            return Err(Error::Config(format!(
                "`depth` {depth} is larger than {MAX_DEPTH}"
            )));
        }
        let dim_head = r.usize("dim_head", inf.dim_head, Some(64))?;
        let heads = r.usize("heads", inf.heads, None)?;
        let default_features = (dim_head as f64 * (dim_head as f64).ln()) as usize;
        let no_projection = r.bool("no_projection", None, false)?;
        // With no_projection the checkpoint still carries an (unused) projection matrix.
        let nb_features = r.usize("nb_features", inf.nb_features, Some(default_features))?;
        let local_window_size = r.usize("local_window_size", None, Some(256))?;
        let causal = r.bool("causal", None, false)?;
        let ff_mult = r.usize("ff_mult", inf.ff_mult, Some(4))?;
        let ff_glu = r.bool("ff_glu", inf.ff_glu, false)?;
        let generalized_attention = r.bool("generalized_attention", None, false)?;
        let use_scalenorm = r.bool("use_scalenorm", inf.use_scalenorm, false)?;
        let use_rezero = r.bool("use_rezero", inf.use_rezero, false)?;
        let tie_embed = r.bool("tie_embed", inf.tie_embed, false)?;
        let rotary_position_emb = r.bool("rotary_position_emb", inf.rotary_position_emb, true)?;
        let axial_position_emb = r.bool("axial_position_emb", inf.axial_position_emb, false)?;
        let shift_tokens = r.bool("shift_tokens", inf.shift_tokens, false)?;
        let qkv_bias = r.bool("qkv_bias", inf.qkv_bias, false)?;
        let attn_out_bias = r.bool("attn_out_bias", inf.attn_out_bias, false)?;

        let kernel_fn = match map.get("kernel_fn") {
            None | Some(Value::Null) => {
                r.origins.insert("kernel_fn", Origin::Default);
                KernelFn::Relu
            }
            Some(Value::String(s)) => {
                r.origins.insert("kernel_fn", Origin::Config);
                KernelFn::parse(s)?
            }
            Some(v) => {
                return Err(Error::Config(format!(
                    "`kernel_fn` must be a string such as \"relu\", found {v}"
                )))
            }
        };

        let local_attn_heads = match map.get("local_attn_heads") {
            None | Some(Value::Null) => {
                r.origins.insert("local_attn_heads", Origin::Default);
                vec![0; depth]
            }
            Some(Value::Array(items)) => {
                r.origins.insert("local_attn_heads", Origin::Config);
                let per_layer: Vec<usize> = items
                    .iter()
                    .map(|v| v.as_u64().map(|x| x as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        Error::Config("`local_attn_heads` must hold non-negative integers".into())
                    })?;
                match per_layer.len() {
                    1 => vec![per_layer[0]; depth],
                    n if n == depth => per_layer,
                    n => {
                        return Err(Error::Config(format!(
                            "`local_attn_heads` lists {n} layers but depth is {depth}"
                        )))
                    }
                }
            }
            Some(_) => {
                r.origins.insert("local_attn_heads", Origin::Config);
                vec![r.usize("local_attn_heads", None, Some(0))?; depth]
            }
        };

        let axial_position_shape = match map.get("axial_position_shape") {
            None | Some(Value::Null) => {
                r.origins.insert("axial_position_shape", Origin::Default);
                axial_position_emb.then(|| (max_seq_len.div_ceil(64), 64))
            }
            Some(Value::Array(items)) if items.len() == 2 => {
                r.origins.insert("axial_position_shape", Origin::Config);
                let a = items[0].as_u64();
                let b = items[1].as_u64();
                match (a, b) {
                    (Some(a), Some(b)) if a > 0 && b > 0 => Some((a as usize, b as usize)),
                    _ => {
                        return Err(Error::Config(
                            "`axial_position_shape` must be two positive integers".into(),
                        ))
                    }
                }
            }
            Some(v) => {
                return Err(Error::Config(format!(
                    "`axial_position_shape` must be two positive integers, found {v}"
                )))
            }
        };

        let kernel_eps = get_f32(map, "kernel_eps")?;
        r.origins.insert(
            "kernel_eps",
            if kernel_eps.is_some() {
                Origin::Config
            } else {
                Origin::Default
            },
        );
        let denominator_eps = get_f32(map, "denominator_eps")?;
        r.origins.insert(
            "denominator_eps",
            if denominator_eps.is_some() {
                Origin::Config
            } else {
                Origin::Default
            },
        );
        let tokenizer = match map.get("tokenizer") {
            None | Some(Value::Null) => TokenizerKind::Byte,
            Some(Value::String(s)) if s == "byte" => TokenizerKind::Byte,
            // A file name in the model directory, nothing outside it.
            Some(Value::String(s))
                if s.ends_with(".json") && !s.contains(['/', '\\']) && !s.starts_with('.') =>
            {
                TokenizerKind::File(s.clone())
            }
            Some(v) => {
                return Err(Error::Unsupported {
                    option: "tokenizer".into(),
                    reason: format!(
                        "{v} is not a known tokenizer (supported: \"byte\", or the name of a \
                         Hugging Face tokenizer file in the model directory such as \
                         \"tokenizer.json\")"
                    ),
                })
            }
        };
        r.origins.insert(
            "tokenizer",
            if map.contains_key("tokenizer") {
                Origin::Config
            } else {
                Origin::Default
            },
        );

        let weight_format = match map.get(crate::quant::format::CONFIG_KEY) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                s.parse::<crate::quant::format::QuantFormat>()
                    .map_err(|reason| Error::Unsupported {
                        option: crate::quant::format::CONFIG_KEY.into(),
                        reason,
                    })?,
            ),
            Some(v) => {
                return Err(Error::Config(format!(
                    "`{}` must be a string (\"q8_0\", \"q4_0\" or \"q4_1\"), found {v}",
                    crate::quant::format::CONFIG_KEY
                )))
            }
        };
        r.origins.insert(
            crate::quant::format::CONFIG_KEY,
            if weight_format.is_some() {
                Origin::Config
            } else {
                Origin::Default
            },
        );

        // Training-only or architecture-changing keys that are accepted but must keep the value
        // inference can honour.
        for (key, ok_value) in [("reversible", false), ("cross_attend", false)] {
            if get_bool(map, key)? == Some(!ok_value) {
                return Err(Error::Unsupported {
                    option: key.into(),
                    reason: match key {
                        "reversible" => "reversible layers change the residual stream".into(),
                        _ => "cross attention needs an encoder context; this runtime decodes a causal LM".into(),
                    },
                });
            }
        }
        get_bool(map, "auto_check_redraw")?;
        get_usize(map, "ff_chunks")?;
        for key in ["emb_dropout", "ff_dropout", "attn_dropout"] {
            get_f32(map, key)?;
        }
        if !matches!(
            map.get("feature_redraw_interval"),
            None | Some(Value::Null) | Some(Value::Number(_))
        ) {
            return Err(Error::Config(
                "`feature_redraw_interval` must be an integer or null".into(),
            ));
        }

        let config = Config {
            num_tokens,
            max_seq_len,
            dim,
            depth,
            heads,
            dim_head,
            nb_features,
            local_attn_heads,
            local_window_size,
            causal,
            ff_mult,
            ff_glu,
            generalized_attention,
            kernel_fn,
            use_scalenorm,
            use_rezero,
            tie_embed,
            rotary_position_emb,
            axial_position_emb,
            axial_position_shape,
            shift_tokens,
            qkv_bias,
            attn_out_bias,
            no_projection,
            kernel_eps: kernel_eps.unwrap_or(1e-4),
            denominator_eps: denominator_eps.unwrap_or(1e-6),
            tokenizer,
            weight_format,
            origins: r.origins,
        };
        config.validate()?;
        Ok(config)
    }
}
