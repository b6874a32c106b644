#!/usr/bin/env python3
"""Build golden test fixtures for `performer` from performer-pytorch 1.1.4 `PerformerLM`.

Usage (from the repository root):

    python -m venv scripts/.venv && scripts/.venv/bin/pip install -r scripts/requirements.txt
    scripts/.venv/bin/python scripts/make_fixtures.py            # writes tests/fixtures/<name>/
    scripts/.venv/bin/python scripts/make_fixtures.py default_a  # only some fixtures

Every fixture directory gets
    config.json          PerformerLM constructor kwargs (performer-pytorch names; kernel_fn as a string)
    model.safetensors    safetensors.torch.save_model(model, path)
    expected.safetensors tokens (int64 [T]), logits_eps0, logits_prefix, logits_full, logits_causal
                         (float32 [T, V]; see tests/fixtures/README.md)
    tensors.txt          name / dtype / shape of every tensor in model.safetensors

The script is deterministic: everything random is drawn from seeded torch generators, on the CPU,
with one thread.
"""

import contextlib
import json
import math
import os
import shutil
import struct
import sys

import torch
from torch import nn

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

import performer_pytorch.performer_pytorch as pp  # noqa: E402
from performer_pytorch import PerformerLM  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_model, save_file, save_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")

KERNEL_FNS = {"relu": nn.ReLU, "gelu": nn.GELU}

# name -> spec. `kwargs` are the PerformerLM constructor kwargs exactly as written to config.json
# (kernel_fn as a string). `T` is the number of test tokens. The remaining keys tune the random
# model so that it is non-trivial (see perturb()).
FIXTURES = {
    "default_a": dict(
        seed=1, T=64,
        kwargs=dict(num_tokens=256, max_seq_len=128, dim=64, depth=2, heads=2, dim_head=32, causal=True),
    ),
    "default_b": dict(
        seed=2, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=48, depth=3, heads=3, dim_head=24, nb_features=37,
                    causal=True),
    ),
    "opt_relu_glu": dict(
        seed=3, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, nb_features=24,
                    causal=True, generalized_attention=True, kernel_fn="relu", ff_glu=True, ff_mult=2,
                    qkv_bias=True, attn_out_bias=True),
    ),
    "opt_scalenorm_tie": dict(
        seed=4, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=4, dim_head=8, nb_features=20,
                    causal=True, use_scalenorm=True, tie_embed=True, rotary_position_emb=False),
        emb_scale=0.35,
    ),
    "opt_rezero_shift": dict(
        seed=5, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=40, depth=2, heads=2, dim_head=12, nb_features=30,
                    causal=True, use_rezero=True, shift_tokens=True, ff_mult=3),
    ),
    "opt_noproj": dict(
        seed=6, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, nb_features=24,
                    causal=True, no_projection=True),
    ),
    "opt_local": dict(
        seed=7, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=36, depth=2, heads=3, dim_head=12, nb_features=32,
                    causal=True, local_attn_heads=1, local_window_size=16),
    ),
    "opt_axial": dict(
        seed=8, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, nb_features=40,
                    causal=True, rotary_position_emb=False, axial_position_emb=True, axial_position_shape=[8, 8]),
    ),
    "opt_gelu_kernel": dict(
        seed=9, T=48,
        kwargs=dict(num_tokens=256, max_seq_len=64, dim=32, depth=2, heads=2, dim_head=16, nb_features=24,
                    causal=True, generalized_attention=True, kernel_fn="gelu"),
    ),
}

# same weights as default_a, cast; expected.safetensors is default_a's (f32 model) file
CAST_FIXTURES = {"default_a_f16": ("default_a", torch.float16), "default_a_bf16": ("default_a", torch.bfloat16)}


def torch_kwargs(kwargs):
    kw = dict(kwargs)
    if "kernel_fn" in kw:
        kw["kernel_fn"] = KERNEL_FNS[kw["kernel_fn"]]()
    if "axial_position_shape" in kw:
        kw["axial_position_shape"] = tuple(kw["axial_position_shape"])
    return kw


@contextlib.contextmanager
def zero_eps():
    """Kernel eps (softmax_kernel) and denominator eps (causal_linear_attention_noncuda) set to 0."""
    kw_old = dict(pp.softmax_kernel.__kwdefaults__)
    def_old = pp.causal_linear_attention_noncuda.__defaults__
    assert kw_old["eps"] == 1e-4 and def_old == (128, 1e-6), (kw_old, def_old)
    pp.softmax_kernel.__kwdefaults__["eps"] = 0.0
    pp.causal_linear_attention_noncuda.__defaults__ = (128, 0.0)
    try:
        yield
    finally:
        pp.softmax_kernel.__kwdefaults__["eps"] = kw_old["eps"]
        pp.causal_linear_attention_noncuda.__defaults__ = def_old


def check_noncuda_path(model):
    for m in model.modules():
        if isinstance(m, pp.FastAttention):
            assert m.causal_linear_fn is pp.causal_linear_attention_noncuda, "expected the non-CUDA causal path"


def perturb(model, spec, gen):
    """Make a random model non-trivial; every value drawn from `gen`."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    with torch.no_grad():
        model.token_emb.weight.mul_(spec.get("emb_scale", 1.0))
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1.0 + 0.1 * randn(*mod.weight.shape))
                mod.bias.copy_(0.1 * randn(*mod.bias.shape))
            elif isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.1 * randn(*mod.bias.shape))
            elif isinstance(mod, pp.PreScaleNorm):
                # ScaleNorm output has unit L2 norm; a gain ~ sqrt(dim) gives LayerNorm-like magnitudes
                dim = model.token_emb.weight.shape[1]
                mod.g.copy_(math.sqrt(dim) * (1.0 + 0.1 * randn(1)))
            elif isinstance(mod, pp.ReZero):
                # default g is 1e-3 (layers nearly vanish); use random nonzero gains of either sign
                u = torch.rand((), generator=gen)
                sign = 1.0 if torch.rand((), generator=gen) < 0.7 else -1.0
                mod.g.copy_(sign * (0.3 + 0.7 * u))
            if isinstance(mod, pp.Attention):
                # sharper attention than the default init
                mod.to_q.weight.mul_(spec.get("qk_scale", 1.0))
                mod.to_k.weight.mul_(spec.get("qk_scale", 1.0))
        if model.to_out is not None:
            model.to_out.weight.mul_(spec.get("out_scale", 4.0))


def build_model(spec):
    torch.manual_seed(spec["seed"])
    model = PerformerLM(**torch_kwargs(spec["kwargs"]))
    gen = torch.Generator().manual_seed(1000 + spec["seed"])
    perturb(model, spec, gen)
    model.eval()
    return model


@contextlib.contextmanager
def per_prefix_fast_attention():
    """Every FastAttention (FAVOR+ heads) output at position t is computed from positions <= t only,
    in every layer: out[t] = fast_attention(q[:t+1], k[:t+1], v[:t+1])[t]. This is the exact
    streaming semantics of the runtime (for any eps); local heads are causal by construction."""
    orig = pp.FastAttention.forward

    def forward(self, q, k, v):
        n = q.shape[-2]
        outs = [orig(self, q[..., : t + 1, :], k[..., : t + 1, :], v[..., : t + 1, :])[..., -1:, :] for t in range(n)]
        return torch.cat(outs, dim=-2)

    pp.FastAttention.forward = forward
    try:
        yield
    finally:
        pp.FastAttention.forward = orig


@contextlib.contextmanager
def uniform_fast_attention():
    """Diagnostic only: FAVOR+ heads replaced by a causal running mean of v."""
    orig = pp.FastAttention.forward

    def forward(self, q, k, v):
        n = v.shape[-2]
        return v.cumsum(dim=-2) / torch.arange(1, n + 1, dtype=v.dtype)[:, None]

    pp.FastAttention.forward = forward
    try:
        yield
    finally:
        pp.FastAttention.forward = orig


@torch.no_grad()
def compute_expected(model, tokens):
    T = tokens.shape[0]
    x = tokens[None]
    logits_full = model(x)[0].float()
    logits_prefix = torch.stack([model(x[:, : t + 1])[0, -1] for t in range(T)]).float()
    with zero_eps():
        logits_eps0 = model(x)[0].float()
        prefix_eps0 = torch.stack([model(x[:, : t + 1])[0, -1] for t in range(T)]).float()
        with per_prefix_fast_attention():
            causal_eps0 = model(x)[0].float()
    with per_prefix_fast_attention():
        logits_causal = model(x)[0].float()
    with uniform_fast_attention():
        logits_uniform = model(x)[0].float()
    stats = dict(
        causality_eps0=(prefix_eps0 - logits_eps0).abs().max().item(),
        prefix_vs_eps0=(logits_prefix - logits_eps0).abs().max().item(),
        full_vs_prefix=(logits_full - logits_prefix).abs().max().item(),
        full_vs_eps0=(logits_full - logits_eps0).abs().max().item(),
        causal_eps0_vs_eps0=(causal_eps0 - logits_eps0).abs().max().item(),
        causal_vs_prefix=(logits_causal - logits_prefix).abs().max().item(),
        causal_vs_eps0=(logits_causal - logits_eps0).abs().max().item(),
        row0_causal_vs_prefix=(logits_causal[0] - logits_prefix[0]).abs().max().item(),
        uniform_attn_vs_eps0=(logits_uniform - logits_eps0).abs().max().item(),
        max_abs_logit=logits_eps0.abs().max().item(),
        std_logit=logits_eps0.std().item(),
    )
    expected = dict(tokens=tokens, logits_eps0=logits_eps0, logits_prefix=logits_prefix, logits_full=logits_full,
                    logits_causal=logits_causal)
    return expected, stats


def save_model_canonical(model, path):
    """safetensors.torch.save_model, then the header's __metadata__ (alias -> kept name, written from a
    Rust HashMap in random order) is re-serialized with sorted keys so that reruns are byte-identical.
    Tensor entries, offsets and data are untouched; the header keeps its length."""
    save_model(model, path)
    with open(path, "rb") as fh:
        raw = fh.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n, (len(text), n)
    text = text + b" " * (n - len(text))
    with open(path, "wb") as fh:
        fh.write(raw[:8] + text + raw[8 + n :])


def write_tensor_listing(path, out_path):
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        lines = []
        for name in sorted(f.keys()):
            sl = f.get_slice(name)
            lines.append(f"{name}\t{sl.get_dtype()}\t{list(sl.get_shape())}")
    with open(out_path, "w") as fh:
        fh.write("# name\tdtype\tshape  (tensors in model.safetensors)\n")
        fh.write("\n".join(lines) + "\n")
        if meta:
            # save_model records every dropped alias in __metadata__ as  alias -> kept name
            pairs = sorted(meta.items())
            ok = all(k.startswith("performer.proj_updater.instance.")
                     and v == "performer.net." + k[len("performer.proj_updater.instance."):] for k, v in pairs)
            if ok:
                fh.write(f"# __metadata__: {len(pairs)} aliases 'performer.proj_updater.instance.X' -> "
                         "'performer.net.X' (dropped by save_model; not tensors in the file)\n")
            else:
                for k, v in pairs:
                    fh.write(f"# __metadata__: {k} -> {v}\n")


def write_fixture(name, spec):
    d = os.path.join(OUT_DIR, name)
    os.makedirs(d, exist_ok=True)
    model = build_model(spec)
    check_noncuda_path(model)
    proj_before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("projection_matrix")}

    gen = torch.Generator().manual_seed(2000 + spec["seed"])
    V = spec["kwargs"]["num_tokens"]
    tokens = torch.randint(0, V, (spec["T"],), generator=gen, dtype=torch.int64)
    expected, stats = compute_expected(model, tokens)

    # eval mode: the projection matrices were not redrawn by the forwards
    for k, v in model.state_dict().items():
        if k.endswith("projection_matrix"):
            assert torch.equal(v, proj_before[k]), k
    assert model.performer.proj_updater.calls_since_last_redraw.item() == 0

    with open(os.path.join(d, "config.json"), "w") as fh:
        json.dump(spec["kwargs"], fh, indent=2)
        fh.write("\n")
    model_path = os.path.join(d, "model.safetensors")
    save_model_canonical(model, model_path)
    save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(d, "expected.safetensors"))
    write_tensor_listing(model_path, os.path.join(d, "tensors.txt"))

    # round trip: a freshly constructed model (different random init) loaded from the file
    # reproduces the logits exactly, so the file holds everything the forward uses
    torch.manual_seed(12345)
    fresh = PerformerLM(**torch_kwargs(spec["kwargs"])).eval()
    missing, unexpected = load_model(fresh, model_path)
    assert not missing and not unexpected, (missing, unexpected)
    with torch.no_grad():
        assert torch.equal(fresh(tokens[None])[0], expected["logits_full"]), "round trip mismatch"
    return model, expected, stats


def write_cast_fixture(name, base_name, dtype, base_model):
    d = os.path.join(OUT_DIR, name)
    os.makedirs(d, exist_ok=True)
    base_dir = os.path.join(OUT_DIR, base_name)
    shutil.copyfile(os.path.join(base_dir, "config.json"), os.path.join(d, "config.json"))
    shutil.copyfile(os.path.join(base_dir, "expected.safetensors"), os.path.join(d, "expected.safetensors"))
    model = PerformerLM(**torch_kwargs(FIXTURES[base_name]["kwargs"])).eval()
    model.load_state_dict(base_model.state_dict())
    model = model.to(dtype)
    model_path = os.path.join(d, "model.safetensors")
    save_model_canonical(model, model_path)
    write_tensor_listing(model_path, os.path.join(d, "tensors.txt"))

    # reference for the cast weights: the cast weights upcast to f32, f32 compute
    up = PerformerLM(**torch_kwargs(FIXTURES[base_name]["kwargs"])).eval()
    load_model(up, model_path, strict=True)  # copy_ upcasts to the f32 parameters
    with safe_open(os.path.join(base_dir, "expected.safetensors"), framework="pt") as f:
        tokens = f.get_tensor("tokens")
        ref = f.get_tensor("logits_eps0")
    with torch.no_grad(), zero_eps():
        logits_up = up(tokens[None])[0]
    # tight reference for a runtime that upcasts the stored weights to f32 and computes in f32
    save_file({"logits_eps0": logits_up.float().contiguous()}, os.path.join(d, "expected_upcast.safetensors"))
    return dict(upcast_eps0_vs_f32_eps0=(logits_up - ref).abs().max().item())


def main(argv):
    names = argv[1:] or list(FIXTURES) + list(CAST_FIXTURES)
    models, all_stats = {}, {}
    for name in names:
        if name in FIXTURES:
            try:
                model, _, stats = write_fixture(name, FIXTURES[name])
            except Exception as e:  # an option performer-pytorch cannot build: report and skip
                print(f"{name}: SKIPPED ({type(e).__name__}: {e})")
                continue
            models[name] = model
            all_stats[name] = stats
        elif name in CAST_FIXTURES:
            base, dtype = CAST_FIXTURES[name]
            if base not in models:
                models[base] = build_model(FIXTURES[base])
            all_stats[name] = write_cast_fixture(name, base, dtype, models[base])
        else:
            raise SystemExit(f"unknown fixture {name}")
        print(name, json.dumps({k: float(f"{v:.3e}") for k, v in all_stats[name].items()}), flush=True)
        if "causality_eps0" in all_stats[name]:
            # with both eps = 0, performer-pytorch is causal: appending tokens does not move earlier logits
            assert all_stats[name]["causality_eps0"] <= 1e-5, all_stats[name]
    if not argv[1:]:
        with open(os.path.join(OUT_DIR, "stats.json"), "w") as fh:
            json.dump({k: {kk: float(f"{vv:.4g}") for kk, vv in v.items()} for k, v in all_stats.items()}, fh, indent=1)
            fh.write("\n")
    return all_stats


if __name__ == "__main__":
    main(sys.argv)
