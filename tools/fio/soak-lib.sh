# Shared by snapshot-soak.sh and crash-soak.sh (sourced, not run): the throwaway daemon, the VDI under test and
# the fio job for its size. Expects SHALE, SIZE, DIR set by the caller's argument parsing; sets job, keep, sock,
# daemon, uri, bytes and the helper `c` (the CLI on the soak's daemon).

# Build `shale` unless --shale was given; pick the fio job for the VDI size; make the work directory.
soak_prepare() {
    local prefix=$1 here repo
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    repo=$(cd "$here/../.." && pwd)
    if [[ -z "$SHALE" ]]; then
        (cd "$repo" && cargo build -q -p shale) || exit 1
        SHALE="${CARGO_TARGET_DIR:-$repo/target}/debug/shale"
    fi
    job="$here/nbd-churn.fio"
    [[ "$SIZE" == 1G || "$SIZE" == 1024M ]] && job="$here/nbd-stress.fio"
    keep=1
    if [[ -z "$DIR" ]]; then DIR=$(mktemp -d "/var/tmp/$prefix.XXXXXX"); keep=0; fi
    mkdir -p "$DIR"
    if [[ -e "$DIR/state" ]]; then echo "$DIR/state exists: pass an empty or new --dir" >&2; exit 2; fi
    sock="$DIR/shale.sock"
}

c() { "$SHALE" --socket "$sock" "$@"; }

# Start (or restart, after a kill) the daemon on DIR/state and wait until it answers.
soak_start_daemon() {
    "$SHALE" serve --state-dir "$DIR/state" --socket "$sock" --no-nbd-tcp >> "$DIR/daemon.log" 2>&1 &
    daemon=$!
    for _ in $(seq 300); do c sr list > /dev/null 2>&1 && return 0; sleep 0.1; done
    echo "the daemon did not start (see $DIR/daemon.log)"
    return 1
}

# Create the VDI `soak` of SIZE and read its NBD URI and size in bytes.
soak_create_vdi() {
    c vdi create --name soak --size "$SIZE" > /dev/null || exit 1
    bytes=$(c --json vdi show soak | python3 -c 'import json,sys; print(json.load(sys.stdin)["size"])')
    uri=$(c --json vdi export soak | python3 -c 'import json,sys; print(json.load(sys.stdin)["unix_uri"])')
}
