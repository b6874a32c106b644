#!/usr/bin/env bash
# Issue 24's targets on a live `performer serve` with the shipped model (models/performer-byte):
# a full 6 MB session disk with SIGTERM and a restart, SIGTERM under hostile clients, header and
# body timeouts, time to first token beside a 400k-token prompt, RSS under concurrent uploads.
# One PASS/FAIL/SKIP line per target (scripts/server_targets.py); exit 1 if any failed.
# Usage: scripts/server_targets.sh [BIN] [WORK_DIR]   (default: the release binary, built here)
# The disk target needs a tmpfs: as root (or with sudo) one is mounted with `mount -t tmpfs -o
# size=6m`; where that is not possible the target is reported SKIP with the reason.
# ONLY=disk,shutdown,timeouts,ttft,uploads runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${1:-}"
WORK="${2:-target/server-targets}"
if [[ -z "$BIN" ]]; then
    cargo build --release --quiet -p performer-cli --bin performer
    BIN=target/release/performer
fi
mkdir -p "$WORK"
TMPFS="$WORK/tmpfs"
mkdir -p "$TMPFS"
MOUNTED=""
SUDO=""
[[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n"
if [[ "$(id -u)" == 0 || -n "$SUDO" ]] && $SUDO mount -t tmpfs -o size=6m performer-targets "$TMPFS" 2>"$WORK/mount.err"; then
    MOUNTED=1
    [[ -n "$SUDO" ]] && $SUDO chown "$(id -u)" "$TMPFS"
    trap '$SUDO umount "$TMPFS"' EXIT
else
    echo "server_targets: cannot mount a tmpfs at $TMPFS ($(cat "$WORK/mount.err" 2>/dev/null || echo 'not root and no sudo')): the full-disk target is skipped" >&2
fi
python3 scripts/server_targets.py "$BIN" models/performer-byte "$WORK" "${MOUNTED:+$TMPFS}"
