#!/usr/bin/env python3
"""End-to-end check of the export path: build a random causal PerformerLM, `torch.save` its
state dict, export it with scripts/export_performer_pytorch.py, run `performer logits` on it
and compare with performer-pytorch's own forward (both epsilons patched to 0, where
performer-pytorch is exactly causal).

    python scripts/check_export.py [--performer target/release/performer]
Prints the max |difference| relative to max(1, max |logit|) and exits non-zero above 1e-4.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import performer_pytorch.performer_pytorch as pp
from performer_pytorch import PerformerLM

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--performer", default=os.path.join(HERE, "..", "target", "release", "performer"))
    args = ap.parse_args()
    torch.manual_seed(7)
    torch.set_num_threads(1)
    kwargs = dict(num_tokens=256, max_seq_len=96, dim=96, depth=3, heads=4, dim_head=20,
                  nb_features=50, causal=True, ff_glu=True, qkv_bias=True)
    model = PerformerLM(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pp.softmax_kernel.__kwdefaults__["eps"] = 0.0
    defaults = list(pp.causal_linear_attention_noncuda.__defaults__)
    defaults[-1] = 0.0
    pp.causal_linear_attention_noncuda.__defaults__ = tuple(defaults)
    tokens = torch.randint(0, 256, (1, 80))
    with torch.no_grad():
        want = model(tokens)[0].numpy()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt.pt")
        torch.save(model.state_dict(), ckpt)
        kw = os.path.join(tmp, "kwargs.json")
        json.dump(kwargs, open(kw, "w"))
        out = os.path.join(tmp, "model")
        subprocess.run([sys.executable, os.path.join(HERE, "export_performer_pytorch.py"),
                        "--checkpoint", ckpt, "--kwargs", kw, "--out", out,
                        "--kernel-eps", "0", "--denominator-eps", "0"], check=True)
        npy = os.path.join(tmp, "l.npy")
        subprocess.run([args.performer, "logits", "--model", out, "--tokens",
                        ",".join(str(t) for t in tokens[0].tolist()), "--out", npy], check=True)
        got = np.load(npy)
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(got - want).max())
    print(f"max |logit| {np.abs(want).max():.3f}, max |diff| {diff:.3e}, relative {diff / scale:.3e}")
    sys.exit(0 if diff <= 1e-4 * scale else 1)


if __name__ == "__main__":
    main()
