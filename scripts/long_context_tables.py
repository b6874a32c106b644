#!/usr/bin/env python3
"""Markdown tables for MODEL_CARD.md from the JSON files of scripts/measure_long_context.sh.

    python3 scripts/long_context_tables.py OUT_DIR
"""
import json
import statistics
import sys

o = sys.argv[1]
J = lambda f: json.load(open(f"{o}/{f}"))


def by_pos(kind):
    old, new = J(f"old-{kind}.json"), J(f"new-{kind}.json")
    rows = {}
    for m, v in (("old", old), ("new", new)):
        for b in v["by_position"]:
            rows.setdefault(b["label"], {})[m] = b
    out = ["| positions | bytes scored | old model bpb | new model bpb |", "|---|---:|---:|---:|"]
    for label, r in rows.items():
        n = (r.get("new") or r.get("old"))["scored"]
        f = lambda m: f"{r[m]['bits_per_byte']:.3f}" if m in r else "—"
        out.append(f"| {label} | {n:,} | {f('old')} | {f('new')} |")
    out.append(f"| **all** | {new['scored']:,} | **{old['bits_per_byte']:.3f}** | **{new['bits_per_byte']:.3f}** |")
    return "\n".join(out)


print("### heldout.txt, one stream\n")
print(by_pos("stream"))
print("\n### heldout.txt, --window 512\n")
print(by_pos("w512"))
print("\n### held-out split (252,866 bytes), one stream\n")
print(by_pos("split"))

print("\n### generation: dictionary-word share\n")
print("| model | seed | first 500 bytes | last 1,000 bytes |\n|---|---:|---:|---:|")
for m in ("old", "new"):
    for s in (1, 2, 3):
        a, b = J(f"{m}-seed{s}-first500.json"), J(f"{m}-seed{s}-last1000.json")
        print(f"| {m} | {s} | {a['share']:.1%} ({a['dictionary_words']}/{a['words']}) | "
              f"{b['share']:.1%} ({b['dictionary_words']}/{b['words']}) |")

print("\n### decode speed, one thread (tg 256 tokens/s, mean of 3 repetitions per run; runs alternate)\n")
rows = {}
for r in (1, 2, 3):
    for m in ("new", "old"):
        try:
            v = J(f"{m}-bench{r}.json")
        except FileNotFoundError:
            continue
        for x in v["rows"]:
            key = (x["test"], x["depth"], x["tokens"])
            rows.setdefault(key, {}).setdefault(m, []).append(x["tokens_per_s"]["mean"])
print("| test | depth | old runs (tokens/s) | new runs (tokens/s) | new/old (median) |\n|---|---:|---|---|---:|")
for (t, d, n), v in sorted(rows.items()):
    if "old" in v and "new" in v:
        mo, mn = statistics.median(v["old"]), statistics.median(v["new"])
        print(f"| {t}{n} | {d} | {', '.join(f'{x:,.0f}' for x in v['old'])} | "
              f"{', '.join(f'{x:,.0f}' for x in v['new'])} | {mn / mo:.3f} |")
