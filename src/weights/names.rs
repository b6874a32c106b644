//! The checkpoint naming scheme of performer-pytorch 1.1.4's `PerformerLM`, and what the tensor
//! shapes say about the config.
//!
//! Block modules nest differently with the options: `PreLayerNorm(fn)` puts the attention at
//! `layers.{L}.0.fn`, `PreShiftTokens` adds one more `.fn`, and the feed-forward sits inside a
//! `Chunk`, one `.fn` deeper still. `state_dict()` also lists every block tensor a second time
//! under `performer.proj_updater.instance.*`; lookups fall back to that alias, and the alias is
//! otherwise ignored.

use crate::config::{Config, Inferred};
use crate::weights::WeightFile;

/// Prefix of the block stack.
pub const LAYERS: &str = "performer.net.layers";
/// The alias prefix `state_dict()` adds for the same tensors.
pub const ALIAS_LAYERS: &str = "performer.proj_updater.instance.layers";

/// Looks a name up, falling back to its `proj_updater.instance` alias.
pub fn resolve<'a>(file: &WeightFile, name: &'a str) -> Option<std::borrow::Cow<'a, str>> {
    if file.contains(name) {
        return Some(name.into());
    }
    let alias = name.replacen(LAYERS, ALIAS_LAYERS, 1);
    file.contains(&alias).then_some(alias.into())
}

/// Names of one block's tensors for a given config.
#[derive(Debug, Clone)]
pub struct BlockNames {
    /// `…{L}.0` — the attention residual branch.
    pub attn_branch: String,
    /// The attention module (`…{L}.0.fn` or deeper).
    pub attn: String,
    /// `…{L}.1` — the feed-forward residual branch.
    pub ff_branch: String,
    /// The feed-forward module.
    pub ff: String,
}

impl BlockNames {
    /// The names for layer `layer`.
    pub fn new(layer: usize, shift_tokens: bool) -> Self {
        let shift = if shift_tokens { ".fn" } else { "" };
        let attn_branch = format!("{LAYERS}.{layer}.0");
        let ff_branch = format!("{LAYERS}.{layer}.1");
        BlockNames {
            attn: format!("{attn_branch}.fn{shift}"),
            ff: format!("{ff_branch}.fn{shift}.fn"),
            attn_branch,
            ff_branch,
        }
    }

    /// Names for a config.
    pub fn for_config(config: &Config, layer: usize) -> Self {
        Self::new(layer, config.shift_tokens)
    }
}

/// Reads what the shapes determine. Keys the file cannot settle stay `None`.
pub fn infer(file: &WeightFile) -> Inferred {
    // A q4_0 weight stores two codes per byte: its logical width is twice the stored one.
    let shape = |n: &str| {
        resolve(file, n).and_then(|n| {
            let mut s = file.shape(&n)?.to_vec();
            let packed = file.raw(&n).is_ok_and(|r| r.dtype() == "U8")
                && file.contains(&format!("{n}{}", crate::quant::format::SCALES_SUFFIX));
            if let (true, Some(last)) = (packed, s.last_mut()) {
                *last = last.saturating_mul(2);
            }
            Some(s)
        })
    };
    let mut inf = Inferred::default();
    if let Some(s) = shape("token_emb.weight").filter(|s| s.len() == 2) {
        inf.num_tokens = Some(s[0]);
        inf.dim = Some(s[1]);
    }
    // Depth: the highest layer index present, under either prefix.
    let depth = file
        .entries()
        .filter_map(|(name, _)| {
            name.strip_prefix(LAYERS)
                .or_else(|| name.strip_prefix(ALIAS_LAYERS))
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.split('.').next())
                .and_then(|l| l.parse::<usize>().ok())
        })
        .max()
        .and_then(|l| l.checked_add(1))
        // Every layer holds at least one entry: an index beyond the entry count is not a
        // depth the file can settle (and would size allocations from a bogus name).
        .filter(|&d| d <= file.entries().count());
    inf.depth = depth;

    // Nesting: PreShiftTokens adds one `.fn` level.
    let shift = [false, true]
        .into_iter()
        .find(|&s| shape(&format!("{}.to_q.weight", BlockNames::new(0, s).attn)).is_some());
    inf.shift_tokens = shift;
    let names = BlockNames::new(0, shift.unwrap_or(false));

    if let Some(p) =
        shape(&format!("{}.fast_attention.projection_matrix", names.attn)).filter(|s| s.len() == 2)
    {
        inf.nb_features = Some(p[0]);
        inf.dim_head = Some(p[1]);
    }
    let rotary = shape("layer_pos_emb.emb");
    inf.rotary_position_emb = Some(rotary.is_some());
    if let (None, Some(r)) = (inf.dim_head, rotary.as_ref().filter(|s| s.len() == 2)) {
        inf.dim_head = Some(r[1]);
    }
    inf.axial_position_emb = Some(file.contains("pos_emb.weights.0"));
    inf.max_seq_len = shape("pos_emb.emb")
        .or_else(|| shape("pos_emb.emb.weight"))
        .filter(|s| s.len() == 2)
        .map(|s| s[0]);
    if let (Some(q), Some(dh)) = (shape(&format!("{}.to_q.weight", names.attn)), inf.dim_head) {
        if q.len() == 2 && dh > 0 && q[0].is_multiple_of(dh) {
            inf.heads = Some(q[0] / dh);
        }
    }
    inf.tie_embed = Some(!file.contains("to_out.weight"));
    inf.qkv_bias = shift.map(|_| shape(&format!("{}.to_q.bias", names.attn)).is_some());
    inf.attn_out_bias = shift.map(|_| shape(&format!("{}.to_out.bias", names.attn)).is_some());
    if let (Some(w1), Some(w2), Some(dim)) = (
        shape(&format!("{}.w1.weight", names.ff)),
        shape(&format!("{}.w2.weight", names.ff)),
        inf.dim,
    ) {
        if w1.len() == 2 && w2.len() == 2 && dim > 0 {
            inf.ff_glu = Some(w2[1].checked_mul(2) == Some(w1[0]));
            if w2[1].is_multiple_of(dim) {
                inf.ff_mult = Some(w2[1] / dim);
            }
        }
    }
    match shape(&format!("{}.g", names.attn_branch)) {
        Some(g) if g.is_empty() => {
            inf.use_rezero = Some(true);
            inf.use_scalenorm = Some(false);
        }
        Some(_) => {
            // ScaleNorm wins over ReZero in performer-pytorch, so use_rezero may have been set
            // too: the checkpoint cannot tell.
            inf.use_scalenorm = Some(true);
        }
        None if shape(&format!("{}.norm.weight", names.attn_branch)).is_some() => {
            inf.use_rezero = Some(false);
            inf.use_scalenorm = Some(false);
        }
        None => {}
    }
    inf
}
