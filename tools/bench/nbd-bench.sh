#!/usr/bin/env bash
# NBD benchmark: one run, one machine, one backing file.
#
# Measures 4k random read/write at QD32 and 1M sequential read/write at QD8 through fio's nbd engine (and the 4k
# jobs again over two connections, `-2c`: two fio jobs of QD32 each, as multi-conn clients do) for
#   shale          Shale's NBD server (block-backend/examples/nbd-serve.rs) exporting the raw file (FileDevice)
#   qemu-raw       qemu-nbd on the same raw file (cache=none, aio=io_uring)
#   qemu-qcow2     qemu-nbd on a fully allocated qcow2 copy of it
#   qemu-qcow2-snap qemu-nbd on a qcow2 overlay whose backing file is that qcow2 (i.e. writes after a snapshot;
#                  every job gets a new overlay on the previous one, so each job starts right after a snapshot and
#                  reads see what earlier jobs wrote, exactly as for shale-thin-snap)
#   shale-thin     a throwaway `shale serve` daemon exporting a native thin VDI of the same size (filled first, no
#                  snapshot: head-owned clusters are overwritten in place), over its NBD Unix socket
#   shale-thin-snap the same daemon, a second filled thin VDI that gets a fresh snapshot before every job (so writes
#                  take the redirect-on-write path, like qemu-qcow2-snap's first writes to each cluster)
#   extra targets  any NBD URI given with --uri NAME=URI
# and, as the machine's limit, fio io_uring with O_DIRECT on the raw file itself (no NBD).
# Every result is printed with its ratio to qemu-raw, to qemu-qcow2, and (for writes) to qemu-qcow2-snap, and with
# the server's CPU time per I/O (srv-us/IO: the server process's utime+stime over the measured window / I/Os), which
# on a small machine shared with fio says more about the server than IOPS do.
# Targets (issue 3): Shale >= 1.2x qemu-raw on every row; shale-thin-snap >= 2x qemu-qcow2-snap on writes.
#
# Usage: tools/bench/nbd-bench.sh [--size 2G] [--runtime 10] [--dir DIR] [--jobs "randread randwrite seqread seqwrite randread-2c randwrite-2c"]
#                                 [--uri NAME=URI]... [--only "shale shale-thin qemu-raw ..."] [--shale-bin PATH]
#                                 [--shale-cli PATH] [--keep]
#
# Needs: cargo (unless --shale-bin and --shale-cli), fio with the nbd engine, qemu-img, qemu-nbd, python3.
# Binaries are the dev-profile builds (the data-path crates are optimised there; see Cargo.toml).
set -euo pipefail

SIZE=2G
RUNTIME=10
DIR="${TMPDIR:-/var/tmp}/shale-nbd-bench"
JOBS="randread randwrite seqread seqwrite randread-2c randwrite-2c"
EXTRA=()
ONLY=""
SHALE_BIN=""
SHALE_CLI=""
KEEP=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --uri) EXTRA+=("$2"); shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --shale-bin) SHALE_BIN="$2"; shift 2 ;;
        --shale-cli) SHALE_CLI="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=python3
for t in fio qemu-img qemu-nbd "$PY"; do
    command -v "$t" >/dev/null || { echo "nbd-bench: $t is required" >&2; exit 1; }
done

wanted() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }

if [[ -z "$SHALE_BIN" ]] && wanted shale; then
    echo "# building nbd-serve" >&2
    (cd "$REPO" && cargo build -q -p shale-block --example nbd-serve)
    SHALE_BIN="${CARGO_TARGET_DIR:-$REPO/target}/debug/examples/nbd-serve"
fi
if [[ -z "$SHALE_CLI" ]] && { wanted shale-thin || wanted shale-thin-snap; }; then
    echo "# building shale" >&2
    (cd "$REPO" && cargo build -q -p shale --bin shale)
    SHALE_CLI="${CARGO_TARGET_DIR:-$REPO/target}/debug/shale"
fi

mkdir -p "$DIR"
RAW="$DIR/base.raw"
QCOW="$DIR/base.qcow2"
SNAPBASE="$DIR/snapbase.qcow2"
STATE="$DIR/shale-state"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$STATE"
    if [[ $KEEP -eq 0 ]]; then rm -f "$RAW" "$QCOW" "$SNAPBASE" "$DIR"/snap-*.qcow2 "$DIR"/*.sock; fi
}
trap cleanup EXIT

# Fully written backing file, so reads measure real blocks rather than holes.
want_bytes=$(numfmt --from=iec "$SIZE")
if [[ ! -f "$RAW" || $(stat -c %s "$RAW") -ne $want_bytes ]]; then
    echo "# writing $SIZE backing file $RAW" >&2
    rm -f "$RAW"
    fio --name=fill --filename="$RAW" --size="$SIZE" --rw=write --bs=1M --iodepth=16 --ioengine=io_uring \
        --direct=1 --randrepeat=0 --refill_buffers --output=/dev/null
fi
if wanted qemu-qcow2 || wanted qemu-qcow2-snap; then
    if [[ ! -f "$QCOW" ]]; then
        echo "# converting to $QCOW" >&2
        qemu-img convert -f raw -O qcow2 "$RAW" "$QCOW"
    fi
fi
if wanted qemu-qcow2-snap; then
    # The snapshot chain's base is its own copy: the qemu-qcow2 target writes into $QCOW.
    echo "# copying $QCOW to $SNAPBASE" >&2
    cp --reflink=auto "$QCOW" "$SNAPBASE"
    SNAP_BACKING=$SNAPBASE
fi

wait_sock() {
    for _ in $(seq 100); do [[ -S "$1" ]] && return 0; sleep 0.05; done
    echo "nbd-bench: $1 did not appear" >&2; return 1
}

# Start a server in the background; sets STARTED_PID.
start_bg() {
    local sock="$1"; shift
    rm -f "$sock"
    "$@" >"$DIR/$(basename "$sock").log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_sock "$sock"
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

qemu_nbd() { # sock fmt image
    start_bg "$1" qemu-nbd -t -f "$2" --cache=none --aio=io_uring --discard=unmap -e 8 -x vol -k "$1" "$3"
}

job_args() {
    case "$1" in
        randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
        randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        randread-2c) echo "--rw=randread --bs=4k --iodepth=32 --numjobs=2 --group_reporting" ;;
        randwrite-2c) echo "--rw=randwrite --bs=4k --iodepth=32 --numjobs=2 --group_reporting" ;;
        seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
        seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
        *) echo "nbd-bench: unknown job $1" >&2; exit 2 ;;
    esac
}

# Print "IOPS MiB/s" from fio's JSON on stdin.
parse() {
    "$PY" -c '
import json, sys
text = sys.stdin.read()
j = json.loads(text[text.index("{"):])["jobs"][0]  # the nbd engine prints a line before the JSON
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1048576
print("%.0f %.1f" % (iops, bw))'
}

# CPU time (utime+stime, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Prints "IOPS MiB/s US" where US is the server's CPU microseconds per I/O (process CPU over the measured
# window divided by IOPS x runtime; "-" without a server PID).
run_fio() { # job, server pid or "", then engine args
    local job="$1" pid="$2"; shift 2
    local out="$DIR/fio-$job.json" t0 t1 res
    # shellcheck disable=SC2046
    fio --name="$job" $(job_args "$job") --time_based --runtime="$RUNTIME" --ramp_time=1 --size="$SIZE" \
        --randrepeat=0 --norandommap --output-format=json "$@" >"$out" &
    local fpid=$!
    sleep 1 # the ramp, which fio leaves out of its figures
    [[ -n "$pid" ]] && t0=$(cpu_ticks "$pid")
    wait "$fpid"
    [[ -n "$pid" ]] && t1=$(cpu_ticks "$pid")
    res=$(parse <"$out")
    if [[ -n "$pid" ]]; then
        read -r iops _ <<<"$res"
        echo "$res $("$PY" -c "import os,sys; t=float(sys.argv[1]); n=float(sys.argv[2])*float(sys.argv[3]); print('%.1f' % (t * 1e6 / os.sysconf('SC_CLK_TCK') / n) if n else '-')" "$((t1 - t0))" "$iops" "$RUNTIME")"
    else
        echo "$res -"
    fi
}

nbd_fio() { run_fio "$1" "${3:-}" --ioengine=nbd --uri="$2"; }

# A throwaway daemon with two filled thin VDIs of $SIZE in its default SR (same filesystem as the raw file).
THIN_URI=""
DAEMON_PID=""
SNAPV_URI=""
SNAP_N=0
QSNAP_N=0
shale_cli() { "$SHALE_CLI" --socket "$STATE/s.sock" "$@"; }
if wanted shale-thin || wanted shale-thin-snap; then
    rm -rf "$STATE"
    mkdir -p "$STATE"
    echo "# starting shale serve ($STATE)" >&2
    start_bg "$STATE/s.sock" "$SHALE_CLI" serve --state-dir "$STATE" --socket "$STATE/s.sock" --no-nbd-tcp
    DAEMON_PID=$STARTED_PID
    for _ in $(seq 100); do shale_cli sr list >/dev/null 2>&1 && break; sleep 0.1; done
    for v in thin snapvdi; do
        shale_cli vdi create --name "$v" --size "$SIZE" >/dev/null
        uri=$(shale_cli --json vdi export "$v" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
        echo "# filling $v ($uri)" >&2
        fio --name=fill --ioengine=nbd --uri="$uri" --size="$SIZE" --rw=write --bs=1M --iodepth=8 \
            --randrepeat=0 --refill_buffers --output=/dev/null
        if [[ $v == thin ]]; then THIN_URI=$uri; else SNAPV_URI=$uri; fi
    done
fi

declare -A RES
TARGETS=()
add_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]] || TARGETS+=("$1"); }

for job in $JOBS; do
    echo "# $job" >&2
    if wanted shale; then
        add_target shale
        start_bg "$DIR/shale.sock" "$SHALE_BIN" "$RAW" --unix "$DIR/shale.sock" --name vol
        RES[shale,$job]=$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/shale.sock" "$STARTED_PID")
        stop_pid "$STARTED_PID"
    fi
    if wanted qemu-raw; then
        add_target qemu-raw
        qemu_nbd "$DIR/qraw.sock" raw "$RAW"
        RES[qemu-raw,$job]=$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/qraw.sock" "$STARTED_PID")
        stop_pid "$STARTED_PID"
    fi
    if wanted qemu-qcow2; then
        add_target qemu-qcow2
        qemu_nbd "$DIR/qcow.sock" qcow2 "$QCOW"
        RES[qemu-qcow2,$job]=$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/qcow.sock" "$STARTED_PID")
        stop_pid "$STARTED_PID"
    fi
    if wanted qemu-qcow2-snap; then
        add_target qemu-qcow2-snap
        # Like the Shale VDI, which takes a new snapshot per job and keeps what earlier jobs wrote: each job
        # gets a new overlay on top of the previous one (an external snapshot chain), so reads see the history.
        QSNAP_N=$((QSNAP_N + 1))
        SNAP="$DIR/snap-$QSNAP_N.qcow2"
        qemu-img create -q -f qcow2 -b "$SNAP_BACKING" -F qcow2 "$SNAP"
        SNAP_BACKING=$SNAP
        qemu_nbd "$DIR/snap.sock" qcow2 "$SNAP"
        RES[qemu-qcow2-snap,$job]=$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/snap.sock" "$STARTED_PID")
        stop_pid "$STARTED_PID"
    fi
    if wanted shale-thin; then
        add_target shale-thin
        RES[shale-thin,$job]=$(nbd_fio "$job" "$THIN_URI" "$DAEMON_PID")
    fi
    if wanted shale-thin-snap; then
        add_target shale-thin-snap
        SNAP_N=$((SNAP_N + 1))
        shale_cli vdi snapshot snapvdi --name "bench-$SNAP_N" >/dev/null
        RES[shale-thin-snap,$job]=$(nbd_fio "$job" "$SNAPV_URI" "$DAEMON_PID")
    fi
    for e in "${EXTRA[@]}"; do
        name="${e%%=*}"; uri="${e#*=}"
        add_target "$name"
        RES[$name,$job]=$(nbd_fio "$job" "$uri")
    done
    if wanted fio-direct; then
        add_target fio-direct
        RES[fio-direct,$job]=$(run_fio "$job" "" --ioengine=io_uring --direct=1 --filename="$RAW")
    fi
done

ratio() { # a b
    "$PY" -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); print('%.2fx' % (a / b) if b else '-')" "$1" "$2"
}

echo
echo "NBD benchmark: $SIZE backing file, ${RUNTIME}s per job, $(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
printf '%-12s %-16s %10s %10s %9s %12s %12s %14s\n' job target IOPS MiB/s srv-us/IO vs-qemu-raw vs-qcow2 vs-qcow2-snap
for job in $JOBS; do
    for t in "${TARGETS[@]}"; do
        v="${RES[$t,$job]:-}"
        [[ -n "$v" ]] || continue
        read -r iops bw us <<<"$v"
        base="${RES[qemu-raw,$job]:-}"
        qcow="${RES[qemu-qcow2,$job]:-}"
        snap="${RES[qemu-qcow2-snap,$job]:-}"
        r1="-"; r2="-"; r3="-"
        metric=1; [[ $job == seq* ]] && metric=2
        if [[ -n "$base" ]]; then r1=$(ratio "$(cut -d' ' -f$metric <<<"$v")" "$(cut -d' ' -f$metric <<<"$base")"); fi
        if [[ -n "$qcow" ]]; then r3=$(ratio "$(cut -d' ' -f$metric <<<"$v")" "$(cut -d' ' -f$metric <<<"$qcow")"); fi
        if [[ -n "$snap" && $job == *write* ]]; then r2=$(ratio "$(cut -d' ' -f$metric <<<"$v")" "$(cut -d' ' -f$metric <<<"$snap")"); fi
        printf '%-12s %-16s %10s %10s %9s %12s %12s %14s\n' "$job" "$t" "$iops" "$bw" "$us" "$r1" "$r3" "$r2"
    done
done
