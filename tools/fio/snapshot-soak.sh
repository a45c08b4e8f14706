#!/usr/bin/env bash
# Soak a thin VDI under snapshot churn: fio stress with crc32c verification runs on the VDI's NBD export while,
# every few seconds, a snapshot is taken, the snapshot from two rounds before is digested again (it must not have
# changed) and destroyed, GC runs, and `sr check` looks at the metadata. Stops at the first problem.
#
#   tools/fio/snapshot-soak.sh [--shale PATH] [--runtime SECS] [--size 256M|1G] [--interval SECS] [--dir DIR]
#                              [--clones]
#
# --clones: each round also clones its snapshot and writes into the clone (unaligned pattern writes through the
# daemon); two rounds later the snapshot is destroyed first (it stays as the clone's hidden parent), the clone must
# still read as it did, and then the clone is destroyed (GC releases the hidden parent).
# A throwaway daemon (`shale serve`) runs in DIR (default: a new temp dir, removed on success). --size 1G uses
# nbd-stress.fio (four 128 MiB verified writers, trims, readers); smaller sizes use nbd-churn.fio (256 MiB).
# Needs fio with the nbd engine and python3. Exit status 0 only if fio verified everything, no snapshot changed
# and every check passed (`sr check` runs live, so clusters reserved by in-flight writes may show as "leaked":
# only that line is tolerated during the run; the final check, with the SR quiet, must be clean).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
SHALE="" RUNTIME=300 SIZE=256M INTERVAL=4 DIR="" fio="" daemon="" CLONES=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --shale) SHALE="$2"; shift 2 ;;
        --runtime) RUNTIME="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --interval) INTERVAL="$2"; shift 2 ;;
        --dir) DIR="$2"; shift 2 ;;
        --clones) CLONES=1; shift ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=soak-lib.sh
source "$here/soak-lib.sh"
soak_prepare shale-soak
trap 'kill $daemon $fio 2>/dev/null' EXIT
soak_start_daemon || exit 1
soak_create_vdi
echo "soak: $SIZE VDI, $(basename "$job"), ${RUNTIME}s, a snapshot every ${INTERVAL}s$([[ $CLONES -eq 1 ]] && echo " (and a clone)"); logs in $DIR"
NBD_URI="$uri" RUNTIME="$RUNTIME" fio "$job" --output="$DIR/fio.out" 2> "$DIR/fio.err" &
fio=$!
declare -A digest
round=0 fail=0
while kill -0 $fio 2> /dev/null; do
    sleep "$INTERVAL"
    round=$((round + 1))
    c vdi snapshot soak --name "s$round" > /dev/null || { echo "round $round: snapshot failed"; fail=1; break; }
    digest[s$round]=$(c vdi digest "s$round") || { echo "round $round: digest failed"; fail=1; break; }
    if [[ $CLONES -eq 1 ]]; then
        c vdi clone "s$round" --name "c$round" > /dev/null || { echo "round $round: clone failed"; fail=1; break; }
        for k in 1 2 3; do
            off=$(( (round * 7919 + k * 104729) % (bytes / 65536 - 2) * 65536 + k * 1000 ))
            c vdi write "c$round" --offset "$off" --pattern $(( (round * 3 + k) % 255 + 1 )) --length 100000 \
                > /dev/null || { echo "round $round: write to clone failed"; fail=1; break 2; }
        done
        digest[c$round]=$(c vdi digest "c$round") || { echo "round $round: clone digest failed"; fail=1; break; }
    fi
    old=$((round - 2))
    if [[ $old -ge 1 ]]; then
        now=$(c vdi digest "s$old")
        if [[ "$now" != "${digest[s$old]}" ]]; then
            echo "round $round: snapshot s$old changed: ${digest[s$old]} -> $now"; fail=1; break
        fi
        c vdi destroy "s$old" > /dev/null || { echo "round $round: destroy s$old failed"; fail=1; break; }
        if [[ $CLONES -eq 1 ]]; then
            c sr gc local > /dev/null || { echo "round $round: gc failed"; fail=1; break; }
            now=$(c vdi digest "c$old")
            if [[ "$now" != "${digest[c$old]}" ]]; then
                echo "round $round: clone c$old changed once its parent was hidden: ${digest[c$old]} -> $now"; fail=1; break
            fi
            c vdi destroy "c$old" > /dev/null || { echo "round $round: destroy c$old failed"; fail=1; break; }
        fi
    fi
    c sr gc local > /dev/null || { echo "round $round: gc failed"; fail=1; break; }
    if ! c sr check > "$DIR/check.out" 2>&1; then
        if grep -v "problem(s)" "$DIR/check.out" | grep -qv "neither mapped nor free"; then
            echo "round $round: sr check found problems:"; head -40 "$DIR/check.out"; fail=1; break
        fi
    fi
done
if [[ $fail -ne 0 ]]; then kill $fio 2> /dev/null; fi
wait $fio; frc=$?
if [[ $frc -ne 0 ]] || ! grep -q "err= 0" "$DIR/fio.out"; then
    echo "fio failed (exit $frc):"; grep -E "verify|err=" "$DIR/fio.out" "$DIR/fio.err" | head -20; fail=1
fi
if [[ $fail -eq 0 ]]; then
    c sr check > "$DIR/check.out" 2>&1 || { echo "final sr check:"; head -40 "$DIR/check.out"; fail=1; }
    for s in "${!digest[@]}"; do
        c vdi show "$s" > /dev/null 2>&1 || continue
        [[ "$(c vdi digest "$s")" == "${digest[$s]}" ]] || { echo "snapshot $s changed by the end"; fail=1; }
    done
fi
echo "soak: $round rounds, $(grep -oE 'write: IOPS=[^,]*' "$DIR/fio.out" | head -1), $([[ $fail -eq 0 ]] && echo PASSED || echo FAILED)"
kill $daemon; wait $daemon 2> /dev/null
trap - EXIT
[[ $fail -eq 0 && $keep -eq 0 ]] && rm -rf "$DIR"
exit $fail
