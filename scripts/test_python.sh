#!/usr/bin/env bash
# The Python bindings end to end: a fresh virtual environment, `pip install ./python` (maturin
# from PyPI through pip's build isolation, a release build of the extension), pytest and
# numpy, the `performer` binary for the comparisons, then pytest on python/tests.
#
#   scripts/test_python.sh              # venv in target/python-venv (kept between runs)
#   PERFORMER_BIN=target/debug/performer scripts/test_python.sh   # compare against a built binary
#   PYTHON=python3.12 scripts/test_python.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
venv=$root/target/python-venv
start=$(date +%s)

rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check pytest numpy
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$root/python"
# CI passes the binary `cargo test` already built rather than paying for a second (release) build.
if [ -z "${PERFORMER_BIN:-}" ]; then
    cargo build --release --quiet -p performer-cli --manifest-path "$root/Cargo.toml"
    PERFORMER_BIN=$root/target/release/performer
fi
PERFORMER_BIN=$(realpath "$PERFORMER_BIN")

cd "$root/python/tests"
PERFORMER_BIN=$PERFORMER_BIN "$venv/bin/python" -m pytest -q -p no:cacheprovider .
echo "test_python.sh: $(( $(date +%s) - start )) s"
