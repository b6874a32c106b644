#!/usr/bin/env python3
"""Independent re-implementation of the runtime's semantics, checked against the fixtures.

Reads only tests/fixtures/<name>/{config.json, model.safetensors, expected.safetensors} (it does not
import performer_pytorch) and computes the logits token by token with constant-size streaming state,
exactly as shared/favor-math.md and tests/fixtures/README.md describe:
  - eps = 0:       must match logits_eps0   (performer-pytorch full forward, both eps patched to 0)
  - default eps:   must match logits_causal (performer-pytorch with each FAVOR+ output at t computed
                   from the prefix <= t in every layer)
It is a readable executable spec of every option (shift_tokens, ScaleNorm, ReZero, axial/absolute
position embeddings, local heads, no_projection, generalized kernels, GLU, tie_embed, biases).

    scripts/.venv/bin/python scripts/reference_check.py [--f64] [fixture ...]
"""

import json
import math
import os
import sys

import torch

torch.set_num_threads(1)
from safetensors.torch import load_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")

DEFAULTS = dict(dim_head=64, local_attn_heads=0, local_window_size=256, ff_mult=4, nb_features=None,
                ff_glu=False, generalized_attention=False, kernel_fn="relu", use_scalenorm=False,
                use_rezero=False, no_projection=False, tie_embed=False, rotary_position_emb=True,
                axial_position_emb=False, axial_position_shape=None, qkv_bias=False, attn_out_bias=False,
                shift_tokens=False)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def linear(W, prefix, x):
    y = x @ W[prefix + ".weight"].T
    if prefix + ".bias" in W:
        y = y + W[prefix + ".bias"]
    return y


class Model:
    def __init__(self, name, dtype, kernel_eps, denom_eps):
        with open(os.path.join(FIX, name, "config.json")) as fh:
            self.cfg = {**DEFAULTS, **json.load(fh)}
        self.W = {k: v.to(dtype) for k, v in load_file(os.path.join(FIX, name, "model.safetensors")).items()}
        self.dtype, self.keps, self.deps = dtype, kernel_eps, denom_eps
        c = self.cfg
        lah = c["local_attn_heads"]
        lah = list(lah) if isinstance(lah, list) else [lah] * c["depth"]
        self.local_heads = lah
        self.kernel_fn = {"relu": torch.relu, "gelu": gelu}[c["kernel_fn"]]

    # ---- names of the sublayer tensors -------------------------------------------------------
    def sub(self, L, s):
        """(prefix of the norm/gain, prefix of the wrapped module)"""
        c = self.cfg
        base = f"performer.net.layers.{L}.{s}"
        inner = base + ".fn"
        if c["shift_tokens"]:
            inner += ".fn"  # PreShiftTokens(fn)
        if s == 1:
            inner += ".fn"  # Chunk(ff_chunks, FeedForward)
        return base, inner

    # ---- positions ---------------------------------------------------------------------------
    def pos_emb(self, p):
        c, W = self.cfg, self.W
        if c["rotary_position_emb"]:
            return W["pos_emb.emb"][p]  # fixed sinusoid [sin | cos]
        if c["axial_position_emb"]:
            shape = c["axial_position_shape"] or [math.ceil(c["max_seq_len"] / 64), 64]
            assert len(shape) == 2
            return W["pos_emb.weights.0"][0, p // shape[1], 0] + W["pos_emb.weights.1"][0, 0, p % shape[1]]
        return W["pos_emb.emb.weight"][p]

    # ---- feature maps -------------------------------------------------------------------------
    def rotary_global(self, x, p):
        """interleaved pairs (2i, 2i+1) rotated by p * 10000^(-2i/d) (table layer_pos_emb.emb = [sin | cos])"""
        d = x.shape[-1]
        emb = self.W["layer_pos_emb.emb"][p]
        sin, cos = emb[: d // 2].repeat_interleave(2), emb[d // 2:].repeat_interleave(2)
        x2 = x.reshape(*x.shape[:-1], d // 2, 2)
        rot = torch.stack((-x2[..., 1], x2[..., 0]), -1).reshape(x.shape)
        return x * cos + rot * sin

    def init_state(self):
        c = self.cfg
        return [dict(prev=[None, None], heads=None, local_k=[], local_v=[]) for _ in range(c["depth"])]

    def attn(self, L, x, p, st, inner):
        c, W = self.cfg, self.W
        H, d = c["heads"], c["dim_head"]
        lh = self.local_heads[L]
        gh = H - lh
        q = linear(W, inner + ".to_q", x).reshape(H, d)
        k = linear(W, inner + ".to_k", x).reshape(H, d)
        v = linear(W, inner + ".to_v", x).reshape(H, d)
        outs = []
        if gh:
            qg, kg, vg = q[:gh], k[:gh], v[:gh]
            if c["rotary_position_emb"]:
                qg, kg = self.rotary_global(qg, p), self.rotary_global(kg, p)
            if st["heads"] is None:
                st["heads"] = [dict(A=0.0, a=0.0, s=0.0, n=0, M=-math.inf) for _ in range(gh)]
            Pm = W[inner + ".fast_attention.projection_matrix"]  # m x d
            m = Pm.shape[0]
            cn = d ** -0.25
            for h in range(gh):
                S = st["heads"][h]
                if c["no_projection"]:
                    phq = torch.softmax(qg[h], -1)
                    u = kg[h]
                    # exp(k) with a running max; the common factor exp(-M) also scales delta
                    Mn = max(S["M"], u.max().item())
                    scale = math.exp(S["M"] - Mn) if S["n"] else 0.0
                    e = torch.exp(u - Mn)
                    S["A"] = S["A"] * scale + e[:, None] * vg[h][None, :]
                    S["a"] = S["a"] * scale + e
                    S["M"], S["n"] = Mn, S["n"] + 1
                    num = phq @ S["A"]
                    den = phq @ S["a"] + self.deps * math.exp(-Mn) * phq.sum()
                elif c["generalized_attention"]:
                    phq = self.kernel_fn(cn * (Pm @ qg[h])) + 0.001
                    phk = self.kernel_fn(cn * (Pm @ kg[h])) + 0.001
                    S["A"] = S["A"] + phk[:, None] * vg[h][None, :]
                    S["a"] = S["a"] + phk
                    num = phq @ S["A"]
                    den = phq @ S["a"] + self.deps * phq.sum()
                else:
                    r = m ** -0.5
                    uq = cn * (Pm @ qg[h])
                    phq = r * (torch.exp(uq - (cn ** 2) * (qg[h] @ qg[h]) / 2 - uq.max()) + self.keps)
                    uk = cn * (Pm @ kg[h])
                    diag = (cn ** 2) * (kg[h] @ kg[h]) / 2
                    Mn = max(S["M"], uk.max().item())
                    scale = math.exp(S["M"] - Mn) if S["n"] else 0.0
                    e = torch.exp(uk - diag - Mn)
                    S["A"] = S["A"] * scale + e[:, None] * vg[h][None, :]
                    S["a"] = S["a"] * scale + e
                    S["s"] = S["s"] + vg[h]
                    S["M"], S["n"] = Mn, S["n"] + 1
                    Smat = r * (S["A"] + self.keps * S["s"][None, :])
                    z = r * (S["a"] + self.keps * S["n"])
                    num = phq @ Smat
                    den = phq @ z + self.deps * phq.sum()
                outs.append(num / den)
        if lh:
            # local-attention 1.11.2: blocks of w = local_window_size; a query at p sees keys j <= p with
            # j // w >= p // w - 1 (its own block and the whole previous block), softmax(q.k * d^-0.5)
            # with rotate-half rotary at in-window positions: query (p % w) + w, key j - (p // w - 1) * w.
            w = c["local_window_size"]
            st["local_k"].append(k[gh:])
            st["local_v"].append(v[gh:])
            lo = max(0, (p // w - 1) * w)
            K = torch.stack(st["local_k"][lo: p + 1], 1)  # lh x n x d
            V = torch.stack(st["local_v"][lo: p + 1], 1)
            base = (p // w - 1) * w
            inv = self.W[inner + ".local_attn.rel_pos.inv_freq"]  # 1 / 10000^(2i/d), d/2 entries

            def rot_half(x, pos):
                f = pos[:, None] * inv[None, :]
                f = torch.cat((f, f), -1)
                x1, x2 = x[..., : d // 2], x[..., d // 2:]
                return x * f.cos() + torch.cat((-x2, x1), -1) * f.sin()

            qpos = torch.tensor([float(p - base)], dtype=self.dtype)
            kpos = torch.arange(lo, p + 1, dtype=self.dtype) - base
            ql = rot_half(q[gh:][:, None, :] * d ** -0.5, qpos)  # lh x 1 x d
            kl = rot_half(K, kpos)
            att = torch.softmax((ql @ kl.transpose(-1, -2)), -1)  # lh x 1 x n
            outs.extend(list((att @ V)[:, 0, :]))
        out = torch.stack(outs, 0).reshape(H * d)
        return linear(W, inner + ".to_out", out)

    def ff(self, x, inner):
        c, W = self.cfg, self.W
        hdn = linear(W, inner + ".w1", x)
        if c["ff_glu"]:
            a, g = hdn.chunk(2, -1)
            hdn = gelu(a) * g
        else:
            hdn = gelu(hdn)
        return linear(W, inner + ".w2", hdn)

    def step(self, tok, p, state):
        c, W = self.cfg, self.W
        h = W["token_emb.weight"][tok] + self.pos_emb(p)
        for L in range(c["depth"]):
            st = state[L]
            for s in (0, 1):
                base, inner = self.sub(L, s)
                if c["use_scalenorm"]:
                    y = h / h.norm().clamp(min=1e-5) * W[base + ".g"]
                elif c["use_rezero"]:
                    y = h
                else:
                    y = layer_norm(h, W[base + ".norm.weight"], W[base + ".norm.bias"])
                if c["shift_tokens"]:
                    # shifts (0, 1): features [D/2, 2*(D/2)) come from the previous position (zeros at p = 0)
                    half = c["dim"] // 2
                    prev = st["prev"][s]
                    cur = y
                    y = y.clone()
                    y[half: 2 * half] = prev[half: 2 * half] if prev is not None else 0.0
                    st["prev"][s] = cur
                f = self.attn(L, y, p, st, inner) if s == 0 else self.ff(y, inner)
                if c["use_rezero"]:
                    f = f * W[base + ".g"]
                h = h + f
        h = layer_norm(h, W["norm.weight"], W["norm.bias"])
        if c["tie_embed"]:
            return h @ W["token_emb.weight"].T
        return linear(W, "to_out", h)

    def run(self, tokens):
        state = self.init_state()
        return torch.stack([self.step(int(t), p, state) for p, t in enumerate(tokens)])


def main(argv):
    f64 = "--f64" in argv
    names = [a for a in argv[1:] if not a.startswith("--")] or sorted(
        n for n in os.listdir(FIX) if os.path.isdir(os.path.join(FIX, n)))
    dtype = torch.float64 if f64 else torch.float32
    worst = 0.0
    for name in names:
        exp = load_file(os.path.join(FIX, name, "expected.safetensors"))
        tokens = exp["tokens"]
        m0 = Model(name, dtype, 0.0, 0.0)
        m1 = Model(name, dtype, 1e-4, 1e-6)
        l0 = m0.run(tokens).float()
        l1 = m1.run(tokens).float()
        d0 = (l0 - exp["logits_eps0"]).abs().max().item()
        d1 = (l1 - exp["logits_causal"]).abs().max().item()
        dp = (l1 - exp["logits_prefix"]).abs().max().item()
        line = f"{name:18s} eps0 vs logits_eps0 {d0:.2e}  default-eps vs logits_causal {d1:.2e}  vs logits_prefix {dp:.2e}"
        up = os.path.join(FIX, name, "expected_upcast.safetensors")
        if os.path.exists(up):
            du = (l0 - load_file(up)["logits_eps0"]).abs().max().item()
            line += f"  eps0 vs expected_upcast {du:.2e}  (cast weights: only expected_upcast is tight)"
            d0, d1 = du, 0.0
        print(line, flush=True)
        worst = max(worst, d0, d1)
    print(f"worst {worst:.2e}")
    return worst


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv) < 1e-4 else 1)
