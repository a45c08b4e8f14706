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
# and two references that are not servers under test:
#   fio-direct     fio io_uring with O_DIRECT on the raw file itself (no NBD): the disk's limit
#   nbdkit-null    nbdkit's null plugin (reads return zeroes, writes are dropped, no disk I/O): the limit of fio's
#                  nbd client on this machine, i.e. the most any server could show here
# Every result is printed with its ratio to qemu-raw, to qemu-qcow2, and (for writes) to qemu-qcow2-snap, and with
# the server's CPU time per I/O (srv-us/IO: the server process's utime+stime over the measured window / I/Os), which
# on a small machine shared with fio says more about the server than IOPS do. disk-QD is the average number of
# requests queued at or in service by the block device under $DIR during the window (/proc/diskstats' weighted
# time in queue over the elapsed time): how much of fio's queue depth a server gets to the disk. A server whose
# row shows a low disk-QD is bound by its own CPU or latency; one near the fio-direct row by the disk.
# Targets (issue 3): Shale >= 1.2x qemu-raw on every row; shale-thin-snap >= 2x qemu-qcow2-snap on writes.
#
# --transport tcp|tls runs the servers on loopback TCP instead of Unix sockets, plainly or with TLS (the peers
# with the same credentials: a private CA from tools/nbd-tls-certs.sh, server certificate only; fio's libnbd
# finds the CA under a private $HOME/.pki/libnbd). It measures shale, qemu-raw, nbdkit-null and fio-direct only.
#
# --repeat N runs every job N times, in N interleaved rounds (round 1 runs every job on every target, then round
# 2, ...), and prints the median of each figure with the spread of the main metric (min-max, as +-% of the
# median); ratios are of medians. On a shared 2-vCPU machine single runs vary by 10-20 %. Rounds repeat the same
# workload: each starts a new qcow2 overlay chain on the untouched base and a new, freshly filled VDI for
# shale-thin-snap (what the jobs of one round wrote shapes the next round's writes after a snapshot).
#
# Usage: tools/bench/nbd-bench.sh [--size 2G] [--runtime 10] [--repeat 1] [--dir DIR]
#                                 [--jobs "randread randwrite seqread seqwrite randread-2c randwrite-2c"]
#                                 [--uri NAME=URI]... [--only "shale shale-thin qemu-raw ..."] [--shale-bin PATH]
#                                 [--shale-cli PATH] [--transport unix|tcp|tls] [--keep]
#
# Needs: cargo (unless --shale-bin and --shale-cli), fio with the nbd engine, qemu-img, qemu-nbd, python3.
# Binaries are the dev-profile builds (the data-path crates are optimised there; see Cargo.toml).
set -euo pipefail

SIZE=2G
RUNTIME=10
REPEAT=1
DIR="${TMPDIR:-/var/tmp}/shale-nbd-bench"
JOBS="randread randwrite seqread seqwrite randread-2c randwrite-2c"
EXTRA=()
ONLY=""
SHALE_BIN=""
SHALE_CLI=""
KEEP=0
TRANSPORT=unix

while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --uri) EXTRA+=("$2"); shift 2 ;;
        --only) ONLY="$2"; shift 2 ;;
        --shale-bin) SHALE_BIN="$2"; shift 2 ;;
        --shale-cli) SHALE_CLI="$2"; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --transport) TRANSPORT="$2"; shift 2 ;;
        -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=python3
for t in fio qemu-img qemu-nbd "$PY"; do
    command -v "$t" >/dev/null || { echo "nbd-bench: $t is required" >&2; exit 1; }
done
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "nbd-bench: --repeat wants a positive integer" >&2; exit 2; }

wanted() { [[ -z "$ONLY" || " $ONLY " == *" $1 "* ]]; }
case "$TRANSPORT" in
    unix) ;;
    tcp|tls)
        NET_TARGETS="shale qemu-raw nbdkit-null fio-direct"
        for t in ${ONLY:-$NET_TARGETS}; do
            [[ " $NET_TARGETS " == *" $t "* ]] || { echo "nbd-bench: --transport $TRANSPORT measures only $NET_TARGETS" >&2; exit 2; }
        done
        ONLY=${ONLY:-$NET_TARGETS} ;;
    *) echo "nbd-bench: --transport wants unix, tcp or tls" >&2; exit 2 ;;
esac

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
fi

# Wait for a Unix socket file, or for a loopback TCP port ("tcp:PORT") to accept.
wait_sock() {
    for _ in $(seq 100); do
        if [[ "$1" == tcp:* ]]; then
            (exec 3<>"/dev/tcp/127.0.0.1/${1#tcp:}") 2>/dev/null && return 0
        else
            [[ -S "$1" ]] && return 0
        fi
        sleep 0.05
    done
    echo "nbd-bench: $1 did not appear" >&2; return 1
}

# Start a server in the background; sets STARTED_PID. The first argument is what it listens on (wait_sock).
start_bg() {
    local sock="$1"; shift
    [[ "$sock" == tcp:* ]] || rm -f "$sock"
    "$@" >"$DIR/$(basename "$sock").log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_sock "$sock"
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

qemu_nbd() { # sock fmt image [more qemu-nbd arguments]
    local sock="$1" fmt="$2" image="$3"
    shift 3
    # shellcheck disable=SC2046
    start_bg "$sock" qemu-nbd -t -f "$fmt" --cache=none --aio=io_uring --discard=unmap -e 8 -x vol \
        $(qemu_listen "$sock") "$@" "$image"
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

# The /proc/diskstats name of the block device holding $DIR (a partition's own line when $DIR is on one), or "".
disk_of() {
    local dev
    dev=$(stat -c '%d' "$1") || return 0
    local major=$((dev >> 8 & 0xfff)) minor=$(((dev & 0xff) | (dev >> 12 & 0xfff00)))
    awk -v M="$major" -v m="$minor" '$1 == M && $2 == m {print $3}' /proc/diskstats
}
# Weighted milliseconds spent by requests in the queue of disk $1 so far (field 11 of its stats), or 0.
disk_queue_ms() { [[ -n "$1" ]] && awk -v d="$1" '$3 == d {print $14; found=1} END {if (!found) print 0}' /proc/diskstats || echo 0; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
DISK=$(disk_of "$DIR")

# CPU time (utime+stime, in clock ticks) a process has used so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

# Prints "IOPS MiB/s US QD" where US is the server's CPU microseconds per I/O (process CPU over the measured
# window divided by IOPS x runtime; "-" without a server PID) and QD the disk's average queue over that window.
run_fio() { # job, server pid or "", then engine args
    local job="$1" pid="$2"; shift 2
    local out="$DIR/fio-$job.json" t0 t1 res q0 q1 w0 w1 qd
    # shellcheck disable=SC2046
    fio --name="$job" $(job_args "$job") --time_based --runtime="$RUNTIME" --ramp_time=1 --size="$SIZE" \
        --randrepeat=0 --norandommap --output-format=json "$@" >"$out" &
    local fpid=$!
    sleep 1 # the ramp, which fio leaves out of its figures
    [[ -n "$pid" ]] && t0=$(cpu_ticks "$pid")
    q0=$(disk_queue_ms "$DISK") w0=$(now_ms)
    wait "$fpid"
    q1=$(disk_queue_ms "$DISK") w1=$(now_ms)
    [[ -n "$pid" ]] && t1=$(cpu_ticks "$pid")
    res=$(parse <"$out")
    qd=$("$PY" -c "import sys; q, w = float(sys.argv[1]), float(sys.argv[2]); print('%.1f' % (q / w) if w > 0 and sys.argv[3] else '-')" \
        "$((q1 - q0))" "$((w1 - w0))" "$DISK")
    if [[ -n "$pid" ]]; then
        read -r iops _ <<<"$res"
        echo "$res $("$PY" -c "import os,sys; t=float(sys.argv[1]); n=float(sys.argv[2])*float(sys.argv[3]); print('%.1f' % (t * 1e6 / os.sysconf('SC_CLK_TCK') / n) if n else '-')" "$((t1 - t0))" "$iops" "$RUNTIME") $qd"
    else
        echo "$res - $qd"
    fi
}

nbd_fio() { run_fio "$1" "${3:-}" --ioengine=nbd --uri="$2"; }

# Where the shale, qemu-raw and nbdkit-null servers listen, their extra arguments, and their URIs, by transport.
TLS_SHALE=() TLS_QEMU=() TLS_NBDKIT=()
if [[ "$TRANSPORT" == tls ]]; then
    PKI="$DIR/pki"
    bash "$REPO/tools/nbd-tls-certs.sh" "$PKI" >/dev/null
    # libnbd (fio's nbd engine) reads its CA from $HOME/.pki/libnbd; give fio a home of its own.
    mkdir -p "$DIR/fio-home/.pki/libnbd"
    cp "$PKI/ca-cert.pem" "$DIR/fio-home/.pki/libnbd/"
    export HOME="$DIR/fio-home"
    TLS_SHALE=(--tls-cert "$PKI/server-cert.pem" --tls-key "$PKI/server-key.pem")
    TLS_QEMU=(--object "tls-creds-x509,id=tls0,dir=$PKI,endpoint=server,verify-peer=off" --tls-creds tls0)
    TLS_NBDKIT=(--tls=require "--tls-certificates=$PKI")
fi
listen() { # name port -> the wait_sock spec
    if [[ "$TRANSPORT" == unix ]]; then echo "$DIR/$1.sock"; else echo "tcp:$2"; fi
}
uri_of() { # wait_sock spec, export
    local scheme=nbd
    [[ "$TRANSPORT" == tls ]] && scheme=nbds
    if [[ "$1" == tcp:* ]]; then echo "$scheme://127.0.0.1:${1#tcp:}/$2"; else echo "nbd+unix:///$2?socket=$1"; fi
}
shale_listen() { if [[ "$1" == tcp:* ]]; then echo "--tcp 127.0.0.1:${1#tcp:}"; else echo "--unix $1"; fi; }
qemu_listen() { if [[ "$1" == tcp:* ]]; then echo "-b 127.0.0.1 -p ${1#tcp:}"; else echo "-k $1"; fi; }
nbdkit_listen() { if [[ "$1" == tcp:* ]]; then echo "-i 127.0.0.1 -p ${1#tcp:}"; else echo "-U $1"; fi; }
SHALE_AT=$(listen shale 10911)
QRAW_AT=$(listen qraw 10912)
NULL_AT=$(listen null 10913)

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
fi
# Create and fill a thin VDI of $SIZE; sets VDI_URI.
new_vdi() {
    shale_cli vdi create --name "$1" --size "$SIZE" >/dev/null
    VDI_URI=$(shale_cli --json vdi export "$1" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
    echo "# filling $1 ($VDI_URI)" >&2
    fio --name=fill --ioengine=nbd --uri="$VDI_URI" --size="$SIZE" --rw=write --bs=1M --iodepth=8 \
        --randrepeat=0 --refill_buffers --output=/dev/null
}
if wanted shale-thin; then
    new_vdi thin
    THIN_URI=$VDI_URI
fi

TARGETS=()
add_target() { [[ " ${TARGETS[*]} " == *" $1 "* ]] || TARGETS+=("$1"); }
RESULTS="$DIR/results.tsv"
: >"$RESULTS"
record() { # target job "IOPS MiB/s US"
    add_target "$1"
    printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$RESULTS"
}

for ROUND in $(seq "$REPEAT"); do
    # Rounds are repeats of the same workload: every round starts its own overlay chain on the untouched base
    # (the previous round's is deleted) and its own freshly filled VDI for shale-thin-snap.
    rm -f "$DIR"/snap-*.qcow2
    SNAP_BACKING=$SNAPBASE
    if wanted shale-thin-snap; then
        SNAPV="snapvdi-$ROUND"
        new_vdi "$SNAPV"
        SNAPV_URI=$VDI_URI
    fi
    for job in $JOBS; do
        echo "# round $ROUND/$REPEAT: $job" >&2
        if wanted shale; then
            # shellcheck disable=SC2046
            start_bg "$SHALE_AT" "$SHALE_BIN" "$RAW" $(shale_listen "$SHALE_AT") --name vol "${TLS_SHALE[@]}"
            record shale "$job" "$(nbd_fio "$job" "$(uri_of "$SHALE_AT" vol)" "$STARTED_PID")"
            stop_pid "$STARTED_PID"
        fi
        if wanted qemu-raw; then
            qemu_nbd "$QRAW_AT" raw "$RAW" "${TLS_QEMU[@]}"
            record qemu-raw "$job" "$(nbd_fio "$job" "$(uri_of "$QRAW_AT" vol)" "$STARTED_PID")"
            stop_pid "$STARTED_PID"
        fi
        if wanted qemu-qcow2; then
            qemu_nbd "$DIR/qcow.sock" qcow2 "$QCOW"
            record qemu-qcow2 "$job" "$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/qcow.sock" "$STARTED_PID")"
            stop_pid "$STARTED_PID"
        fi
        if wanted qemu-qcow2-snap; then
            # Like the Shale VDI, which takes a new snapshot per job and keeps what earlier jobs wrote: each job
            # gets a new overlay on top of the previous one (an external snapshot chain), so reads see the history.
            QSNAP_N=$((QSNAP_N + 1))
            SNAP="$DIR/snap-$QSNAP_N.qcow2"
            qemu-img create -q -f qcow2 -b "$SNAP_BACKING" -F qcow2 "$SNAP"
            SNAP_BACKING=$SNAP
            qemu_nbd "$DIR/snap.sock" qcow2 "$SNAP"
            record qemu-qcow2-snap "$job" "$(nbd_fio "$job" "nbd+unix:///vol?socket=$DIR/snap.sock" "$STARTED_PID")"
            stop_pid "$STARTED_PID"
        fi
        if wanted shale-thin; then
            record shale-thin "$job" "$(nbd_fio "$job" "$THIN_URI" "$DAEMON_PID")"
        fi
        if wanted shale-thin-snap; then
            SNAP_N=$((SNAP_N + 1))
            shale_cli vdi snapshot "$SNAPV" --name "bench-$SNAP_N" >/dev/null
            record shale-thin-snap "$job" "$(nbd_fio "$job" "$SNAPV_URI" "$DAEMON_PID")"
        fi
        for e in "${EXTRA[@]}"; do
            name="${e%%=*}"; uri="${e#*=}"
            record "$name" "$job" "$(nbd_fio "$job" "$uri")"
        done
        if wanted fio-direct; then
            record fio-direct "$job" "$(run_fio "$job" "" --ioengine=io_uring --direct=1 --filename="$RAW")"
        fi
        if wanted nbdkit-null && command -v nbdkit >/dev/null; then
            # shellcheck disable=SC2046
            start_bg "$NULL_AT" nbdkit -f $(nbdkit_listen "$NULL_AT") "${TLS_NBDKIT[@]}" null "$SIZE"
            record nbdkit-null "$job" "$(nbd_fio "$job" "$(uri_of "$NULL_AT" "")" "$STARTED_PID")"
            stop_pid "$STARTED_PID"
        fi
    done
done

echo
echo "NBD benchmark: $SIZE backing file, ${RUNTIME}s per job, $REPEAT round(s), transport $TRANSPORT, $(nproc) CPUs, $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"
"$PY" - "$RESULTS" "$JOBS" "${TARGETS[@]}" <<'PYEOF'
import statistics, sys
path, jobs, targets = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
runs = {}
for line in open(path):
    _, t, job, fig = line.rstrip("\n").split("\t")
    iops, bw, us, qd = fig.split()
    runs.setdefault((t, job), []).append((float(iops), float(bw), None if us == "-" else float(us),
                                          None if qd == "-" else float(qd)))

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def fig(t, job):
    r = runs.get((t, job))
    if not r:
        return None
    m = 1 if job.startswith("seq") else 0  # MiB/s for 1M jobs, IOPS for 4k jobs
    vals = [x[m] for x in r]
    mid = med(vals)
    spread = (max(vals) - min(vals)) / 2 / mid * 100 if mid and len(vals) > 1 else None
    return med([x[0] for x in r]), med([x[1] for x in r]), med([x[2] for x in r]), mid, spread, med([x[3] for x in r])

def ratio(a, b):
    return "%.2fx" % (a[3] / b[3]) if a and b and b[3] else "-"

print("%-12s %-16s %10s %10s %9s %7s %7s %12s %12s %14s" % ("job", "target", "IOPS", "MiB/s", "srv-us/IO",
      "disk-QD", "spread", "vs-qemu-raw", "vs-qcow2", "vs-qcow2-snap"))
for job in jobs:
    base, qcow, snap = fig("qemu-raw", job), fig("qemu-qcow2", job), fig("qemu-qcow2-snap", job)
    for t in targets:
        f = fig(t, job)
        if not f:
            continue
        iops, bw, us, _, spread, qd = f
        print("%-12s %-16s %10.0f %10.1f %9s %7s %7s %12s %12s %14s" % (
            job, t, iops, bw, "-" if us is None else "%.1f" % us, "-" if qd is None else "%.1f" % qd,
            "-" if spread is None else "+-%.0f%%" % spread,
            ratio(f, base), ratio(f, qcow), ratio(f, snap) if "write" in job else "-"))
PYEOF
