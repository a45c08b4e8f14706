#!/usr/bin/env bash
# Native thin engine benchmark (issue 2, "Benchmarks"), with qemu's qcow2 as the peer in the same run.
#
# Runs snapshot/examples/engine_bench.rs on a throwaway SR in a temporary directory on the local disk
# (O_DIRECT through the io_uring engine, 64 KiB clusters) and measures
#   - snapshot and clone latency (median / p99) for 1 GiB and 1 TiB VDIs, empty and written;
#   - 4k random read IOPS at QD32 with 0, 10 and 100 snapshots (100 random 4k writes after each snapshot);
#   - 4k random write IOPS at QD32 on a fresh VDI (allocating), a written VDI (in place) and right after a
#     snapshot (redirect on write);
# and the qcow2 peer with `qemu-img bench` (cache=none, aio=io_uring, QD32, 4k): backing chains of depth
# 0/10/100 built with `qemu-img create -b` + `qemu-io -c 'write -P'`, and writes into a fresh image, a full image
# and a fresh overlay on a full image. `qemu-img bench` only walks offsets with a fixed step; the step used visits
# every block in a scattered (strided) order. Prints a Markdown table with Shale/qcow2 ratios.
#
# Usage: tools/bench/engine-bench.sh [--secs 5] [--samples 20] [--dir PARENT] [--no-qemu] [--keep] [--out FILE]
#   --secs     seconds per IOPS point (default 5)
#   --samples  snapshots (and clones) timed per latency row (default 20)
#   --dir      parent of the temporary directory (default $TMPDIR or /var/tmp; must be a real disk, not tmpfs)
#   --out      also write the command, the machine and the table to FILE (Markdown)
#
# The example is built with the dev profile, which optimises shale-snapshot/shale-block (opt-level 3) and every
# dependency (opt-level 2); a --release build would rebuild RocksDB for a long time. Takes about 3-4 minutes and
# ~5 GiB of temporary disk space.
set -euo pipefail

SECS=5
SAMPLES=20
PARENT="${TMPDIR:-/var/tmp}"
EXTRA=()
OUT=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --secs) SECS="$2"; shift 2 ;;
        --samples) SAMPLES="$2"; shift 2 ;;
        --dir) PARENT="$2"; shift 2 ;;
        --no-qemu) EXTRA+=(--no-qemu); shift ;;
        --keep) KEEP=1; EXTRA+=(--keep); shift ;;
        --out) OUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "engine-bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

for tool in cargo qemu-img qemu-io; do
    if ! command -v "$tool" >/dev/null; then
        if [ "$tool" = cargo ] || [[ " ${EXTRA[*]-} " != *" --no-qemu "* ]]; then
            echo "engine-bench: $tool not found (install it, or pass --no-qemu for the qemu tools)" >&2
            exit 1
        fi
    fi
done
if [ "$(stat -f -c %T "$PARENT")" = tmpfs ]; then
    echo "engine-bench: $PARENT is tmpfs (no O_DIRECT); pass --dir on a real disk" >&2
    exit 1
fi

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shale-target}"
cd "$ROOT"
# --workspace, not -p shale-snapshot: building one package resolves dependency features differently, which gives
# librocksdb-sys another hash and a second 10+ minute C++ build next to the one the tests use.
cargo build -q --workspace --example engine_bench
BIN="$CARGO_TARGET_DIR/debug/examples/engine_bench"

WORK="$(mktemp -d "$PARENT/shale-engine-bench.XXXXXX")"
cleanup() {
    if [ "$KEEP" = 1 ]; then
        echo "engine-bench: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

CMD="tools/bench/engine-bench.sh --secs $SECS --samples $SAMPLES${EXTRA[*]:+ ${EXTRA[*]}}"
MACHINE="$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), \
kernel $(uname -r), $(findmnt -no FSTYPE -T "$PARENT" 2>/dev/null || echo '?') on $(findmnt -no SOURCE -T "$PARENT" 2>/dev/null || echo '?'), \
$(qemu-img --version 2>/dev/null | head -1 || echo 'no qemu-img'), load average before: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "engine-bench: $MACHINE" >&2
TABLE="$("$BIN" --dir "$WORK/run" --secs "$SECS" --samples "$SAMPLES" "${EXTRA[@]}")"
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

echo
echo "$TABLE"
if [ -n "$OUT" ]; then
    {
        echo "# Native engine benchmark"
        echo
        echo "Command (from the repository root): \`$CMD\`"
        echo
        echo "Machine: $MACHINE; after: $LOAD_AFTER. Date: $(date -u +%Y-%m-%d)."
        echo
        echo "$TABLE"
    } >"$OUT"
    echo "engine-bench: wrote $OUT" >&2
fi
