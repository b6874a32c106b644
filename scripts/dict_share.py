#!/usr/bin/env python3
"""Share of dictionary words in a text (the issue-11 generation target).

    python3 scripts/dict_share.py FILE [--last N] [--first N] [--dict /usr/share/dict/words]

Reads FILE as bytes, takes its last (or first) N bytes (default: all), decodes it as UTF-8
(invalid bytes replaced), and splits it into words: maximal runs of ASCII letters, with an inner
apostrophe kept ("o'er", "king's"). A word counts as a dictionary word when it, or its lower-case
form, is a line of the word list (Debian `wamerican`: /usr/share/dict/words). Prints JSON:
words, dictionary words, share.
"""
import argparse
import json
import re

p = argparse.ArgumentParser()
p.add_argument("file")
p.add_argument("--last", type=int)
p.add_argument("--first", type=int)
p.add_argument("--dict", default="/usr/share/dict/words")
a = p.parse_args()
words = set(w.strip() for w in open(a.dict, encoding="utf-8", errors="replace"))
data = open(a.file, "rb").read()
if a.last:
    data = data[-a.last:]
if a.first:
    data = data[: a.first]
text = data.decode("utf-8", errors="replace")
toks = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)*", text)
hits = sum(1 for t in toks if t in words or t.lower() in words)
print(json.dumps({"file": a.file, "bytes": len(data), "words": len(toks), "dictionary_words": hits,
                  "share": hits / len(toks) if toks else None}))
