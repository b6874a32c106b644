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

print("\n### speed, one thread (tokens/s: mean of 3 repetitions per run; new and old alternate, one pair per round)\n")
import glob
rounds = sorted({int(f.split("bench")[-1].split(".")[0]) for f in glob.glob(f"{o}/new-bench*.json")})
rows = {}
for r in rounds:
    try:
        pair = {m: J(f"{m}-bench{r}.json") for m in ("new", "old")}
    except (FileNotFoundError, ValueError):  # a round not (yet) written
        continue
    for m, v in pair.items():
        for x in v["rows"]:
            key = (x["test"], x["tokens"], x["depth"])
            rows.setdefault(key, {}).setdefault(m, []).append(x["tokens_per_s"]["mean"])
print("| test | depth | rounds | old median | new median | new/old per round | median new/old |")
print("|---|---:|---:|---:|---:|---|---:|")
for (t, n, d), v in sorted(rows.items()):
    ratios = [a / b for a, b in zip(v["new"], v["old"])]
    print(f"| {t}{n} | {d} | {len(ratios)} | {statistics.median(v['old']):,.0f} | {statistics.median(v['new']):,.0f} | "
          f"{', '.join(f'{x:.2f}' for x in ratios)} | {statistics.median(ratios):.3f} |")
