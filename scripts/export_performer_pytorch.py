#!/usr/bin/env python3
"""Export a performer-pytorch `PerformerLM` to a `performer` model directory.

    python scripts/export_performer_pytorch.py --checkpoint ckpt.pt --out models/my-model \
        [--kwargs kwargs.json] [--dtype f32|f16|bf16] [--kernel-eps 0 --denominator-eps 0] \
        [--tokenizer tokenizer.json]

The checkpoint may be
  * a pickled model: `torch.save(model, path)`;
  * a state dict: `torch.save(model.state_dict(), path)` (needs the constructor keyword
    arguments: `--kwargs FILE.json`, or a checkpoint dict holding them, see below);
  * a dict with the weights under "model", "state_dict" or "model_state_dict" and,
    optionally, the constructor keyword arguments under "kwargs" or "config".
State dicts list every block tensor twice, also under `performer.proj_updater.instance.*`
(the same storage); loading them into a fresh model accepts both names, and
`safetensors.torch.save_model` keeps one.

Writes OUT/config.json (the constructor keyword arguments under their performer-pytorch
names; `kernel_fn` as a string) and OUT/model.safetensors (`save_model`). A model trained on
the ids of a Hugging Face tokenizer (not bytes) passes its file with `--tokenizer`: it is copied
to OUT/tokenizer.json and config.json gets `"tokenizer": "tokenizer.json"`.
Requires: torch, performer-pytorch, safetensors (see scripts/requirements.txt).
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
from performer_pytorch import PerformerLM
from safetensors.torch import save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_align import align  # noqa: E402

KERNEL_NAMES = {"ReLU": "relu", "GELU": "gelu"}


def infer_kwargs(model):
    """Reads the constructor arguments back from a live PerformerLM."""
    from performer_pytorch.performer_pytorch import FastAttention, SelfAttention

    attn = [m for m in model.modules() if isinstance(m, SelfAttention)]
    fast = [m for m in model.modules() if isinstance(m, FastAttention)]
    first, fa = attn[0], fast[0]
    ff = model.performer.net.layers[0][1]
    w1 = [m for m in ff.modules() if isinstance(m, torch.nn.Linear)][0]
    dim = model.token_emb.weight.shape[1]
    glu = any(getattr(m, "glu", False) for m in ff.modules())
    kw = dict(
        num_tokens=model.token_emb.weight.shape[0],
        max_seq_len=model.max_seq_len,
        dim=dim,
        depth=len(model.performer.net.layers),
        heads=first.heads,
        dim_head=fa.dim_heads,
        nb_features=fa.nb_features,
        causal=fa.causal,
        local_attn_heads=[a.heads - a.global_heads for a in attn],
        ff_mult=w1.out_features // dim // (2 if glu else 1),
        ff_glu=glu,
        generalized_attention=fa.generalized_attention,
        no_projection=fa.no_projection,
        qkv_bias=first.to_q.bias is not None,
        attn_out_bias=first.to_out.bias is not None,
        tie_embed=model.to_out is None,
        rotary_position_emb=type(model.pos_emb).__name__ == "FixedPositionalEmbedding",
        axial_position_emb=type(model.pos_emb).__name__ == "AxialPositionalEmbedding",
        shift_tokens=type(model.performer.net.layers[0][0].fn).__name__ == "PreShiftTokens"
        or type(getattr(model.performer.net.layers[0][0], "fn", None)).__name__ == "PreShiftTokens",
        use_scalenorm=type(model.performer.net.layers[0][0]).__name__ == "PreScaleNorm",
        use_rezero=type(model.performer.net.layers[0][0]).__name__ == "ReZero",
    )
    if fa.generalized_attention:
        kw["kernel_fn"] = KERNEL_NAMES.get(type(fa.kernel_fn).__name__, type(fa.kernel_fn).__name__)
    if any(kw["local_attn_heads"]):
        kw["local_window_size"] = [a.local_attn for a in attn if a.local_attn][0].window_size
    if kw["axial_position_emb"]:
        kw["axial_position_shape"] = list(model.pos_emb.shape) if hasattr(model.pos_emb, "shape") else None
    return kw


def build(kwargs):
    kw = dict(kwargs)
    for runtime_key in ("kernel_eps", "denominator_eps", "tokenizer"):
        kw.pop(runtime_key, None)
    if isinstance(kw.get("kernel_fn"), str):
        kw["kernel_fn"] = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU()}[kw["kernel_fn"].lower()]
    if isinstance(kw.get("axial_position_shape"), list):
        kw["axial_position_shape"] = tuple(kw["axial_position_shape"])
    if isinstance(kw.get("local_attn_heads"), list):
        kw["local_attn_heads"] = tuple(kw["local_attn_heads"])
    return PerformerLM(**kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--kwargs", help="JSON file with the PerformerLM constructor arguments")
    ap.add_argument("--dtype", choices=["f32", "f16", "bf16"], default="f32")
    ap.add_argument("--kernel-eps", type=float, help="runtime key kernel_eps to write")
    ap.add_argument("--denominator-eps", type=float, help="runtime key denominator_eps to write")
    ap.add_argument("--tokenizer", help="a Hugging Face tokenizer.json the model was trained with")
    args = ap.parse_args()

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    kwargs = json.load(open(args.kwargs)) if args.kwargs else None
    if isinstance(ckpt, PerformerLM):
        model = ckpt
        kwargs = kwargs or infer_kwargs(model)
    else:
        state = ckpt
        if isinstance(ckpt, dict):
            for key in ("model", "state_dict", "model_state_dict"):
                if key in ckpt and isinstance(ckpt[key], dict):
                    state = ckpt[key]
                    break
            kwargs = kwargs or ckpt.get("kwargs") or ckpt.get("config")
        if kwargs is None:
            sys.exit("a state dict needs the constructor arguments: pass --kwargs FILE.json")
        model = build(kwargs)
        # Both the performer.net.* names and their proj_updater.instance.* aliases load.
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "proj_updater.instance" not in k]
        if missing or unexpected:
            sys.exit(f"checkpoint does not fit the arguments: missing {missing}, unexpected {unexpected}")
    if not kwargs.get("causal", False):
        sys.exit("performer runs causal models only (causal=True)")
    model.eval()
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(dtype)
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in kwargs.items() if not callable(v)}
    if "kernel_fn" in kwargs and not isinstance(kwargs["kernel_fn"], str):
        config["kernel_fn"] = KERNEL_NAMES.get(type(kwargs["kernel_fn"]).__name__, "relu")
    if args.kernel_eps is not None:
        config["kernel_eps"] = args.kernel_eps
    if args.denominator_eps is not None:
        config["denominator_eps"] = args.denominator_eps
    if args.tokenizer:
        shutil.copyfile(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
        config["tokenizer"] = "tokenizer.json"
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_model(model, os.path.join(args.out, "model.safetensors"))
    if args.dtype == "f32":
        # f32 tensors on 64-byte boundaries: batched decoding multiplies them where they lie
        # (half-precision ones are widened into an aligned buffer first).
        align(os.path.join(args.out, "model.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n} parameters, {args.dtype}")


if __name__ == "__main__":
    main()
