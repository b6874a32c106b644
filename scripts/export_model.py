#!/usr/bin/env python3
"""Export the trained byte-level Performer LM to models/performer-byte/.

    python scripts/export_model.py [checkpoints/last.pt] [--dtype auto|bfloat16|float16]

Writes config.json, model.safetensors (safetensors.torch.save_model; floating parameters in the
chosen half dtype, buffers — sinusoid tables and projection matrices — kept in float32, the step
counter int64), heldout.txt, eval.json (bits per byte in f32 and in each half dtype) and samples.txt.

Evaluation semantics (eval.json, MODEL_CARD.md): heldout.txt is read as bytes b[0..N). It is cut into
consecutive non-overlapping windows of max_seq_len input bytes, starting at 0, stride max_seq_len:
window w feeds b[w*L .. min(w*L+L, N-1)) and predicts the next byte at every position, so every byte
except b[0] is predicted exactly once, with context = the bytes of its window before it (1..L bytes;
no state carried between windows). bpb = sum of -log2 p(byte) / (N-1). The forward pass is
performer-pytorch's own (causal_linear_attention_noncuda, softmax_kernel) with the kernel and
denominator eps of config.json. "half" rows: weights rounded to that dtype exactly as saved in
model.safetensors, loaded back and computed in float32.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_model, load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_byte_lm as T  # noqa: E402

OUT = "/tmp/export-quick" if os.environ.get("QUICK") == "1" else os.path.join(T.ROOT, "models", "performer-byte")
HELDOUT_BYTES = 32768
QUICK = os.environ.get("QUICK") == "1"  # smoke test of this script only: tiny eval/samples, writes to /tmp


def heldout_text(held):
    raw = held.tobytes()
    start = raw.index(b"\n\n") + 2  # begin at a paragraph boundary
    chunk = raw[start: start + HELDOUT_BYTES]
    return chunk[: chunk.rindex(b"\n") + 1]


def prefix_attention_forward(self, q, k, v):
    """FAVOR+ causal attention with *streaming* semantics, in float64: each layer's output at t equals
    performer-pytorch's attention computed on that layer's inputs 0..t (key stabiliser M_t = running
    max of the key projections up to t, so kernel eps and denominator eps act exactly as in a
    streaming decoder with constant-size state). This is the runtime's definition (favor-math.md);
    performer-pytorch's own full-sequence forward uses the max over the whole sequence instead
    (non-causal unless both eps are 0), and re-running it on each prefix also differs in layers >= 2
    (earlier positions' hidden states then see the prefix's max)."""
    import performer_pytorch.performer_pytorch as pp
    kernel_eps = pp.softmax_kernel.__kwdefaults__["eps"]
    denom_eps = pp.causal_linear_attention_noncuda.__defaults__[1]
    dt = q.dtype
    q, k, v = q.double(), k.double(), v.double()
    W = self.projection_matrix.double()
    d = q.shape[-1]
    c = d ** -0.25
    r = W.shape[0] ** -0.5
    uq = torch.einsum("bhid,jd->bhij", c * q, W)
    dq = (q ** 2).sum(-1, keepdim=True) * c * c / 2
    phq = r * (torch.exp(uq - dq - uq.amax(-1, keepdim=True)) + kernel_eps)  # (b,h,n,m)
    uk = torch.einsum("bhid,jd->bhij", c * k, W)
    dk = (k ** 2).sum(-1, keepdim=True) * c * c / 2
    Mrow = uk.amax(-1)  # (b,h,n)
    Mt = Mrow.cummax(dim=-1).values  # running max
    MT = Mt[..., -1:]
    E = torch.exp(uk - dk - MT.unsqueeze(-1))  # relative to global max, f64
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    G = torch.einsum("bhim,bhjm->bhij", phq, E).masked_fill(~mask, 0.0)  # phi(q_i).E_j, j<=i
    scale = torch.exp(MT - Mt)  # exp(M_T - M_t) (b,h,n)
    sq = phq.sum(-1)  # (b,h,n)
    s_v = v.cumsum(-2)
    cnt = torch.arange(1, n + 1, dtype=q.dtype, device=q.device)
    num = r * (scale.unsqueeze(-1) * (G @ v) + kernel_eps * sq.unsqueeze(-1) * s_v)
    den = r * (scale * G.sum(-1) + kernel_eps * sq * cnt) + denom_eps * sq
    return (num / den.unsqueeze(-1)).to(dt)


def set_prefix_semantics(model, on):
    import performer_pytorch.performer_pytorch as pp
    for fa in pp.find_modules(model, pp.FastAttention):
        if on:
            fa.forward = prefix_attention_forward.__get__(fa)
        elif "forward" in fa.__dict__:
            del fa.forward


@torch.no_grad()
def check_streaming_attention(model, n=64):
    """Per attention module, with its trained projection matrix and random q/k/v (std 2): max |diff|
    between the streaming-semantics pass at position t and performer-pytorch's FastAttention run on
    the prefix 0..t (last position). Must be ~1e-6 (float32 reference)."""
    import performer_pytorch.performer_pytorch as pp
    g = torch.Generator().manual_seed(0)
    err = 0.0
    for fa in pp.find_modules(model, pp.FastAttention):
        d = fa.projection_matrix.shape[1]
        q, k, v = (2 * torch.randn(1, 2, n, d, generator=g) for _ in range(3))
        fa.forward = prefix_attention_forward.__get__(fa)
        mine = fa(q, k, v)
        del fa.forward
        for t in range(n):
            ref = fa(q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])[:, :, -1]
            err = max(err, (mine[:, :, t] - ref).abs().max().item())
    return err


@torch.no_grad()
def streaming_vs_per_prefix(model, data, n=48):
    """Informational: max |logit diff| between the streaming pass and performer-pytorch's full model
    re-run on each prefix (what its generate() does), over the first n positions."""
    x = torch.from_numpy(data[:n].astype(np.int64))[None]
    set_prefix_semantics(model, True)
    full = model(x)[0]
    set_prefix_semantics(model, False)
    err = 0.0
    for t in range(n):
        ref = model(x[:, : t + 1])[0, -1]
        err = max(err, (full[t] - ref).abs().max().item())
    return err


def streaming_bpb(model, data, L):
    set_prefix_semantics(model, True)
    try:
        return bpb(model, data, L)
    finally:
        set_prefix_semantics(model, False)


@torch.no_grad()
def max_diag(model, data, L):
    """max over heldout.txt windows of diag = |x|^2 c^2 / 2 (c = d^-1/4) for queries and keys, and
    the max key projection u — how close a literal f32 evaluation of phi() gets to exp underflow."""
    import performer_pytorch.performer_pytorch as pp
    out = {"query_diag": 0.0, "key_diag": 0.0}
    hooks = []
    def hook(mod, inp, _):
        q, k, _v = inp
        c = q.shape[-1] ** -0.25
        out["query_diag"] = max(out["query_diag"], ((q ** 2).sum(-1) * c * c / 2).max().item())
        out["key_diag"] = max(out["key_diag"], ((k ** 2).sum(-1) * c * c / 2).max().item())
    for fa in pp.find_modules(model, pp.FastAttention):
        hooks.append(fa.register_forward_hook(hook))
    T.eval_windows(model, data, L)
    for h in hooks:
        h.remove()
    return out


def clean(o):
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items()}
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def load_model(ckpt_path):
    ck = torch.load(ckpt_path, weights_only=False)
    model = T.build_model(ck["model_kw"])
    model.load_state_dict(ck["model"])
    model.eval()
    T.use_fast_attention(model, False)
    return model, ck


def rounded_copy(model, dtype):
    m2 = T.build_model(model_kw)
    sd = {}
    for k, v in model.state_dict().items():
        if k in param_names and v.is_floating_point():
            v = v.to(dtype).float()
        sd[k] = v
    m2.load_state_dict(sd)
    m2.eval()
    T.use_fast_attention(m2, False)
    return m2


@torch.no_grad()
def bpb(model, data, L):
    nll, count = T.eval_windows(model, data, L)
    return nll / math.log(2), nll, count


@torch.no_grad()
def causality_check(model, data, L):
    x = torch.from_numpy(data[:L].astype(np.int64))[None]
    full = model(x)
    part = model(x[:, : L // 2])
    return (full[:, : L // 2] - part).abs().max().item()


@torch.no_grad()
def generate(model, prompt, n, L, temperature=0.0, top_k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = list(prompt.encode())
    for _ in range(n):
        x = torch.tensor(toks[-L:])[None]
        logits = model(x)[0, -1].float()
        if temperature == 0.0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                v, _ = logits.topk(top_k)
                logits[logits < v[-1]] = -float("inf")
            nxt = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        toks.append(nxt)
    return bytes(toks).decode("utf-8", errors="replace")


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    dtype_arg = "auto"
    if "--dtype" in sys.argv:
        dtype_arg = sys.argv[sys.argv.index("--dtype") + 1]
        args = [a for a in args if a != dtype_arg]
    ckpt_path = args[0] if args else os.path.join(T.CKPT_DIR, "last.pt")
    model, ck = load_model(ckpt_path)
    zero_eps = ck["zero_eps"]
    kernel_eps, denom_eps = T.set_eps(zero_eps)
    model_kw = ck["model_kw"]
    param_names = {n for n, _ in model.named_parameters()}
    L = model_kw["max_seq_len"]
    os.makedirs(OUT, exist_ok=True)

    corpus, names, sha = T.load_corpus()
    _, held = T.split_corpus(corpus)
    text = heldout_text(held)
    with open(os.path.join(OUT, "heldout.txt"), "wb") as f:
        f.write(text)
    hdata = np.frombuffer(text, dtype=np.uint8)
    if QUICK:
        hdata = hdata[:1025]

    results = {"checkpoint_step": ck["step"], "train_elapsed_s": ck["elapsed"],
               "params": T.n_params(model), "kernel_eps": kernel_eps, "denominator_eps": denom_eps,
               "heldout_file_bytes": len(text), "predicted_bytes": len(text) - 1,
               "window": L, "stride": L}
    results["causality_max_abs_logit_change_when_appending"] = causality_check(model, hdata, L)
    results["streaming_attention_check_max_abs_err"] = check_streaming_attention(model)
    results["streaming_vs_per_prefix_rerun_max_abs_logit_diff_first48"] = streaming_vs_per_prefix(model, hdata)
    results["max_diag_on_heldout"] = max_diag(model, hdata, L)
    variants = {"float32": model}
    for name, dt_ in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        variants[name] = rounded_copy(model, dt_)
    for name, mv in variants.items():
        b, nll, cnt = bpb(mv, hdata, L)
        bs, nlls, _ = streaming_bpb(mv, hdata, L)
        results[name] = {"bpb_full_window_performer_pytorch": b, "nll_full_window_performer_pytorch": nll,
                         "bpb_streaming": bs, "nll_streaming": nlls}
        print(name, results[name], flush=True)
    if dtype_arg == "auto":
        # whichever half dtype stays closer to f32 (streaming = the runtime's semantics)
        dtype_name = min(("bfloat16", "float16"),
                         key=lambda n: abs(results[n]["bpb_streaming"] - results["float32"]["bpb_streaming"]))
    else:
        dtype_name = dtype_arg
    dt = getattr(torch, dtype_name)
    results["shipped_dtype"] = dtype_name

    # save: parameters in half, buffers (pos tables, projection matrices, counter) as they are (f32/int64)
    export = T.build_model(model_kw)
    export.load_state_dict(model.state_dict())
    for n, p in export.named_parameters():
        p.data = p.data.to(dt)
    path = os.path.join(OUT, "model.safetensors")
    save_model(export, path)
    results["safetensors_bytes"] = os.path.getsize(path)

    # reload exactly as saved, compute in f32, confirm the shipped number
    sd = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    m3 = T.build_model(model_kw)
    missing, unexpected = m3.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("performer.proj_updater.instance.") for k in missing), missing
    m3.eval()
    T.use_fast_attention(m3, False)
    b3, nll3, _ = bpb(m3, hdata, L)
    b4, nll4, _ = streaming_bpb(m3, hdata, L)
    results["shipped_reloaded"] = {"bpb_full_window_performer_pytorch": b3, "nll_full_window_performer_pytorch": nll3,
                                   "bpb_streaming": b4, "nll_streaming": nll4}
    print("shipped reloaded", dtype_name, results["shipped_reloaded"], flush=True)
    # samples: eps-0 streaming semantics via the (f32, chunked) training attention — identical math
    if zero_eps:
        T.use_stable_attention(m3, True)
    else:
        set_prefix_semantics(m3, True)

    cfg = {k: model_kw[k] for k in ("num_tokens", "max_seq_len", "dim", "depth", "heads", "dim_head",
                                    "nb_features", "causal")}
    cfg["feature_redraw_interval"] = model_kw.get("feature_redraw_interval", 1000)
    if zero_eps:
        cfg["kernel_eps"] = 0.0
        cfg["denominator_eps"] = 0.0
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")

    samples = []
    prompts = ["ROMEO.\n", "To be, or not to be", "KING.\nMy lords, ", "Enter "]
    for p in prompts:
        samples.append(("greedy", p, generate(m3, p, 20 if QUICK else 200, L)))
    for i, p in enumerate(prompts[:3]):
        samples.append(("sampled T=0.8 top_k=40 seed=%d" % i, p, generate(m3, p, 20 if QUICK else 200, L, 0.8, 40, seed=i)))
    with open(os.path.join(OUT, "samples.txt"), "w") as f:
        for kind, p, s in samples:
            f.write(f"=== {kind} | prompt {p!r} ===\n{s}\n\n")
    with open(os.path.join(OUT, "eval.json"), "w") as f:
        json.dump(clean(results), f, indent=2)
        f.write("\n")
    print(json.dumps(clean(results), indent=2))
