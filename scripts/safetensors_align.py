"""Rewrites a safetensors file so that its tensors start on 64-byte boundaries.

`safetensors` pads the JSON header to 8 bytes only, so f32 rows of an exported model usually
straddle cache lines, and every 512-bit load of performer's batched product touches two lines
(12-20% of its throughput on Zen 4; docs/performance.md). This pads the header with spaces
(the format allows it) so that the data starts on a 64-byte boundary, and stores first the
tensors whose byte sizes are multiples of 64, which then all start on a boundary: the same
layout as performer's own writer (`performer::weights::write_aligned`). The result is an
ordinary safetensors file holding the same tensors and metadata, for any reader.

It is for f32 models: half-precision weights are widened into an aligned buffer before the
batched product, and single-stream bf16 decoding measured slower from an aligned file.

    python3 scripts/safetensors_align.py MODEL_DIR/model.safetensors

The file is replaced atomically (a temporary file in the same directory, fsync, rename).
"""

import json
import os
import struct
import sys
import tempfile

ALIGN = 64


def align(path):
    """Rewrites `path` in place with every whole-line tensor 64-byte aligned."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        meta = header.pop("__metadata__", None)
        # Whole lines first; `sorted` is stable, so each group keeps the file's order.
        names = sorted(
            sorted(header, key=lambda k: header[k]["data_offsets"][0]),
            key=lambda k: (header[k]["data_offsets"][1] - header[k]["data_offsets"][0]) % ALIGN != 0,
        )
        out = {} if meta is None else {"__metadata__": meta}
        offset = 0
        for k in names:
            a, b = header[k]["data_offsets"]
            out[k] = {"dtype": header[k]["dtype"], "shape": header[k]["shape"],
                      "data_offsets": [offset, offset + b - a]}
            offset += b - a
        head = json.dumps(out, separators=(",", ":")).encode()
        head += b" " * ((-(8 + len(head))) % ALIGN)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".align-")
        try:
            with os.fdopen(fd, "wb") as g:
                g.write(struct.pack("<Q", len(head)))
                g.write(head)
                for k in names:
                    a, b = header[k]["data_offsets"]
                    f.seek(base + a)
                    g.write(f.read(b - a))
                g.flush()
                os.fsync(g.fileno())
            os.chmod(tmp, os.stat(path).st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: safetensors_align.py FILE.safetensors [...]")
    for p in sys.argv[1:]:
        align(p)
        print(f"aligned {p}")
