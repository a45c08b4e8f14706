#!/usr/bin/env bash
# Shale's NBD client (block-backend/src/nbd/client.rs) against fio's nbd engine (libnbd), the same export, the
# same run: 4k random reads and writes at QD32 on a filled thin VDI of a throwaway `shale serve`, over one
# connection and over several (the client's multi-conn; fio's peer is one job per connection).
#
#   tools/bench/nbd-client-bench.sh [--size 1G] [--secs 10] [--connections 2] [--repeat 3] [--shale-cli PATH]
#
# Prints IOPS per row (median of --repeat interleaved rounds), each client row as a ratio to fio on the same
# number of connections, and the client's CPU time per I/O (cli-us/IO: for fio, its usr+sys per job, which
# includes libnbd, times the jobs; for Shale's client, getrusage of its process). Needs fio with the nbd engine; builds the shale CLI and the example unless given.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
SIZE=1G SECS=10 CONNS=2 REPEAT=3 SHALE_CLI=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size) SIZE="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --connections) CONNS="$2"; shift 2 ;;
        --repeat) REPEAT="$2"; shift 2 ;;
        --shale-cli) SHALE_CLI="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
command -v fio >/dev/null || { echo "needs fio" >&2; exit 1; }
PY=/usr/bin/python3
# The cached target dir CI and the quickstart use (a fresh one would rebuild RocksDB, 10+ minutes).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shale-target}"
TARGET="$CARGO_TARGET_DIR"
echo "# building the shale CLI and the nbd-client-bench example" >&2
(cd "$REPO" && cargo build -q -p shale-block --example nbd-client-bench && [[ -n "$SHALE_CLI" ]] || cargo build -q --bin shale)
SHALE_CLI="${SHALE_CLI:-$TARGET/debug/shale}"
CLIENT="$TARGET/debug/examples/nbd-client-bench"

STATE=$(mktemp -d "${TMPDIR:-/var/tmp}/shale-client-bench.XXXXXX")
DAEMON=""
trap '[[ -n "$DAEMON" ]] && kill "$DAEMON" 2>/dev/null; wait 2>/dev/null; rm -rf "$STATE"' EXIT
"$SHALE_CLI" serve --state-dir "$STATE" --socket "$STATE/s.sock" --no-nbd-tcp >"$STATE/daemon.log" 2>&1 &
DAEMON=$!
for _ in $(seq 100); do "$SHALE_CLI" --socket "$STATE/s.sock" sr list >/dev/null 2>&1 && break; sleep 0.1; done
"$SHALE_CLI" --socket "$STATE/s.sock" vdi create --name bench --size "$SIZE" >/dev/null
URI=$("$SHALE_CLI" --socket "$STATE/s.sock" --json vdi export bench |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
echo "# filling $SIZE ($URI)" >&2
fio --name=fill --ioengine=nbd --uri="$URI" --size="$SIZE" --rw=write --bs=1M --iodepth=8 --randrepeat=0 \
    --refill_buffers --output=/dev/null

fio_iops() { # rw, jobs (one connection each, QD32 split over them) -> "IOPS us/IO"
    fio --name=b --ioengine=nbd --uri="$URI" --size="$SIZE" --rw="$1" --bs=4k --iodepth=$((32 / $2)) \
        --numjobs="$2" --group_reporting --time_based --runtime="$SECS" --randrepeat=0 --norandommap \
        --output-format=json 2>/dev/null |
        "$PY" -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]
iops=j["read"]["iops"]+j["write"]["iops"]
print("%d %.2f" % (iops, (j["usr_cpu"]+j["sys_cpu"])/100*'"$2"'*1e6/iops))'
}
client_iops() { # rw, connections -> "IOPS us/IO"
    "$CLIENT" "$URI" --rw "$1" --bs 4096 --qd 32 --secs "$SECS" --connections "$2" |
        sed -E 's/.*: ([0-9]+) IOPS.*, ([0-9.]+) us CPU.IO/\1 \2/'
}

declare -A runs cpu
for r in $(seq "$REPEAT"); do
    for rw in randread randwrite; do
        for c in 1 "$CONNS"; do
            f=$(fio_iops "$rw" "$c")
            s=$(client_iops "$rw" "$c")
            runs[$rw,fio,$c]+="${f% *} "
            runs[$rw,shale,$c]+="${s% *} "
            cpu[$rw,fio,$c]+="${f#* } "
            cpu[$rw,shale,$c]+="${s#* } "
            echo "# round $r $rw x$c: fio $f shale $s" >&2
        done
    done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
echo "NBD client benchmark: ${SIZE} thin VDI, 4k QD32, ${SECS}s, median of $REPEAT, $(nproc) CPUs, $(date -u +%FT%H:%MZ)"
printf '%-10s %-6s %-18s %9s %8s %11s\n' job conns client IOPS vs-fio cli-us/IO
for rw in randread randwrite; do
    for c in 1 "$CONNS"; do
        f=$(median "${runs[$rw,fio,$c]}")
        s=$(median "${runs[$rw,shale,$c]}")
        printf '%-10s %-6s %-18s %9s %8s %11s\n' "$rw" "$c" "fio nbd (libnbd)" "$f" "1.00x" "$(median "${cpu[$rw,fio,$c]}")"
        printf '%-10s %-6s %-18s %9s %8s %11s\n' "$rw" "$c" "shale NbdClient" "$s" \
            "$(awk -v a="$s" -v b="$f" 'BEGIN{printf "%.2fx", a/b}')" "$(median "${cpu[$rw,shale,$c]}")"
    done
done
