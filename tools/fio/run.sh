#!/usr/bin/env bash
# Run Shale's NBD fio job files against any NBD URI.
#
#   tools/fio/run.sh nbd://127.0.0.1:10809/vol                 # verify job (export >= 128 MiB)
#   tools/fio/run.sh --stress 600 nbd+unix:///vol?socket=/run/shale/nbd.sock   # 10-minute stress (>= 1 GiB)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
job="$here/nbd-verify.fio"
export RUNTIME=60
if [[ "${1:-}" == "--stress" ]]; then
    job="$here/nbd-stress.fio"
    RUNTIME="${2:?--stress needs a runtime in seconds}"
    shift 2
fi
export NBD_URI="${1:?usage: run.sh [--stress SECONDS] NBD_URI}"
exec fio "$job"
