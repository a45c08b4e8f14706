#!/usr/bin/env bash
# Crash soak: fio stress on a VDI through a throwaway `shale serve` while snapshots are taken and destroyed, then
# `kill -9` of the daemon at a random moment, a restart, and checks: `sr check` clean after recovery and again
# after GC, and every surviving snapshot digests as it did before the crash. Repeats for CYCLES cycles.
#
#   tools/fio/crash-soak.sh [--shale PATH] [--cycles N] [--size 1G] [--dir DIR]
#
# (fio's own verification does not survive the kill; the head's flushed data is covered by the engine's kill -9
# crash test, `snapshot/tests/crash.rs`.) Needs fio with the nbd engine and python3.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHALE="" CYCLES=4 SIZE=1G DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --shale) SHALE="$2"; shift 2 ;;
        --cycles) CYCLES="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=soak-lib.sh
source "$here/soak-lib.sh"
soak_prepare shale-crash-soak
daemon="" fio=""
fail() { echo "cycle $cycle: $*"; kill $daemon $fio 2> /dev/null; exit 1; }
trap 'kill $daemon $fio 2>/dev/null' EXIT
soak_start_daemon || exit 1
soak_create_vdi
echo "crash soak: $SIZE VDI, $(basename "$job"), $CYCLES kill -9 cycles; logs in $DIR"
declare -A digest
n=0
for cycle in $(seq "$CYCLES"); do
    NBD_URI="$uri" RUNTIME=120 fio "$job" --output="$DIR/fio$cycle.out" 2> /dev/null &
    fio=$!
    for _ in 1 2 3; do
        sleep 3
        n=$((n + 1))
        c vdi snapshot soak --name "s$n" > /dev/null || fail "snapshot failed"
        digest[s$n]=$(c vdi digest "s$n") || fail "digest failed"
        if [[ $n -ge 3 ]]; then
            c vdi destroy "s$((n - 2))" > /dev/null || fail "destroy failed"
            unset "digest[s$((n - 2))]"
        fi
    done
    sleep "$((RANDOM % 3)).$((RANDOM % 10))"
    kill -9 "$daemon"; wait "$daemon" 2> /dev/null
    kill "$fio" 2> /dev/null; wait "$fio" 2> /dev/null
    soak_start_daemon || fail "restart failed"
    c sr check > "$DIR/check.out" 2>&1 || { head -20 "$DIR/check.out"; fail "sr check after recovery"; }
    for s in "${!digest[@]}"; do
        [[ "$(c vdi digest "$s")" == "${digest[$s]}" ]] || fail "snapshot $s changed across the crash"
    done
    c sr gc local > /dev/null || fail "gc failed"
    c sr check > "$DIR/check.out" 2>&1 || { head -20 "$DIR/check.out"; fail "sr check after gc"; }
    echo "cycle $cycle: recovered; sr check clean; snapshots ${!digest[*]} unchanged"
done
kill "$daemon"; wait "$daemon" 2> /dev/null
trap - EXIT
[[ $keep -eq 0 ]] && rm -rf "$DIR"
echo "crash soak: PASSED"
