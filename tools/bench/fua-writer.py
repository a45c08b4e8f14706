#!/usr/bin/python3
"""FUA 4 KiB writes at queue depth 1, each into the next 64 KiB cluster of an NBD export (so each one allocates on
a thin VDI), for SECS seconds; prints writes per second.

Run it beside a read job on another connection to see whether durable metadata commits hold up the server's other
connections (tools/bench/RESULTS-nbd.md, "FUA writes no longer stall the I/O thread"). Needs python3-libnbd
(Debian's /usr/bin/python3).

Usage: tools/bench/fua-writer.py URI SECS
"""
import sys
import time

import nbd


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    h = nbd.NBD()
    h.connect_uri(sys.argv[1])
    if not h.can_fua():
        sys.exit("the export does not offer FUA")
    buf = b"\x5a" * 4096
    size = h.get_size()
    n, off, t0 = 0, 0, time.time()
    while time.time() - t0 < float(sys.argv[2]):
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
        n += 1
        off = (off + 65536) % size
    print("fua writes/s %.0f" % (n / (time.time() - t0)))


if __name__ == "__main__":
    main()
