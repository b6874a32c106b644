#!/usr/bin/env python3
"""Time to first token of prompts that share a long head, through a running `performer serve`.

Each repetition sends a fresh random head of HEAD tokens followed by one question of QUESTION
tokens (cold: nothing of it is cached), then the same head followed by another question (warm:
with the prefix cache, it resumes from the state at the head's last slice boundary). Requests
are streamed; the time to first token runs from sending the request to the first chunk that
carries a token (`logprobs: 0` makes every token's chunk count). Cold and warm alternate
(ABAB), so drift on a noisy machine hits both. Prints a markdown table, the medians and their
ratio, and the cache's entries and bytes from /metrics.

Prompts are printable ASCII: one token per character for a byte-level tokenizer (the usage's
prompt_tokens is printed to check). Standard library only.

Usage: prefix_cache_ttft.py BASE_URL [--head 4096] [--question 32] [--reps 5] [--max-tokens 8]
"""

import argparse
import http.client
import json
import random
import statistics
import time
import urllib.parse


def stream(base, prompt, max_tokens):
    """One streamed completion: (seconds to the first token, the usage object)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=3600)
    body = json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "logprobs": 0, "stream_options": {"include_usage": True},
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft, usage = None, None
    for line in resp:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        v = json.loads(data)
        if "error" in v:
            raise SystemExit(f"error chunk: {v}")
        if ttft is None and any(c.get("text") or c.get("logprobs") for c in v.get("choices", [])):
            ttft = time.perf_counter() - start
        if v.get("usage"):
            usage = v["usage"]
    conn.close()
    if ttft is None or usage is None:
        raise SystemExit("the stream ended without a token or without usage")
    return ttft, usage


def metric(base, name):
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise SystemExit(f"no {name} in /metrics")


def text(rng, n):
    return "".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("--head", type=int, default=4096)
    ap.add_argument("--question", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    # One short request first: the first request of a process pays for page faults and
    # thread start-up, which neither side should carry.
    stream(a.base, text(rng, 16), 1)
    print("| rep | cold TTFT ms | warm TTFT ms | cold / warm | prompt tokens | warm cached_tokens "
          "| cache entries | cache MiB |")
    print("|---|---|---|---|---|---|---|---|")
    cold, warm = [], []
    for r in range(a.reps):
        head = text(rng, a.head)
        c, cu = stream(a.base, head + text(rng, a.question), a.max_tokens)
        w, wu = stream(a.base, head + text(rng, a.question), a.max_tokens)
        cold.append(c)
        warm.append(w)
        cached = wu.get("prompt_tokens_details", {}).get("cached_tokens")
        entries = metric(a.base, "performer_prefix_cache_entries")
        mib = metric(a.base, "performer_prefix_cache_bytes") / 2**20
        print(f"| {r + 1} | {c * 1e3:.0f} | {w * 1e3:.1f} | {c / w:.1f} | {cu['prompt_tokens']} "
              f"| {cached} | {entries:.0f} | {mib:.1f} |")
    mc, mw = statistics.median(cold), statistics.median(warm)
    print()
    print(f"median cold TTFT {mc * 1e3:.0f} ms, median warm TTFT {mw * 1e3:.1f} ms, "
          f"ratio {mc / mw:.1f}x")
    entries = metric(a.base, "performer_prefix_cache_entries")
    if entries:
        per = metric(a.base, "performer_prefix_cache_bytes") / entries
        print(f"bytes per cache entry: {per / 2**20:.2f} MiB (one state and its prefix's tokens)")


if __name__ == "__main__":
    main()
