/* Guest for the daemon end-to-end test (tests/tests/vm_daemon.rs), built with vmm/guest's start.S and lib.c.
 *
 * Phase 1 on vda: write the pattern to sectors 0..8, flush, read back and verify; print
 * "shale-guest: phase1 PASS".
 * With a second disk (vdb): it must offer RO, hold the pattern at sectors 0..8 (a snapshot of a phase-1 disk)
 * and refuse a write with IOERR; print "shale-guest: vdb ro PASS" and exit 0 (debug-exit port).
 * Without one, phase 2 runs until the host stops the VM: generation g = 1, 2, ... writes 4 KiB of the 32-bit
 * stamp g at sector 256, then at sector 512, then flushes; every 32 generations it prints "shale-guest: gen G".
 * Any crash-consistent image of vda (e.g. a snapshot taken while it runs) therefore holds uniform stamps a (at
 * 256) and b (at 512) with a == b or a == b + 1. */
#include "guest_lib.h"

static void fill_stamp(u64 buf, u32 g) {
    for (int i = 0; i < 1024; i++) ((volatile u32 *)buf)[i] = g;
}

int guest_main(void) {
    struct vq q;
    u64 buf = DATA_AREA, buf2 = DATA_AREA + 0x10000;
    if (vq_init(&q, VIRTIO_MMIO_BASE, F_VERSION_1 | F_FLUSH | F_RO, 16)) return fail(1, "init vda");
    if (q.features & F_RO) return fail(2, "vda read-only");
    fill_pattern(buf, 0, 8);
    if (do_req(&q, T_OUT, 0, buf, 4096, 0) != 0) return fail(3, "write 0");
    if (do_req(&q, T_FLUSH, 0, 0, 0, 0) != 0) return fail(4, "flush");
    memset((void *)buf2, 0, 4096);
    if (do_req(&q, T_IN, 0, buf2, 4096, 1) != 0 || !check_pattern(buf2, 0, 8)) return fail(5, "verify 0");
    puts_serial("shale-guest: phase1 PASS\n");

    if (mmio_read32(VIRTIO_MMIO_BASE + 0x1000 + R_MAGIC) == 0x74726976 &&
        mmio_read32(VIRTIO_MMIO_BASE + 0x1000 + R_DEVICE_ID) == 2) {
        reg_write(&q, R_STATUS, 0);
        if (vq_init(&q, VIRTIO_MMIO_BASE + 0x1000, F_VERSION_1 | F_FLUSH | F_RO, 16)) return fail(6, "init vdb");
        if (!(q.features & F_RO)) return fail(7, "vdb not read-only");
        memset((void *)buf2, 0, 4096);
        if (do_req(&q, T_IN, 0, buf2, 4096, 1) != 0 || !check_pattern(buf2, 0, 8)) return fail(8, "vdb content");
        if (do_req(&q, T_OUT, 8, buf, 512, 0) != 1) return fail(9, "vdb write not refused");
        puts_serial("shale-guest: vdb ro PASS\n");
        return 0;
    }

    for (u32 g = 1;; g++) {
        fill_stamp(buf, g);
        if (do_req(&q, T_OUT, 256, buf, 4096, 0) != 0) return fail(10, "stamp 256");
        if (do_req(&q, T_OUT, 512, buf, 4096, 0) != 0) return fail(11, "stamp 512");
        if (do_req(&q, T_FLUSH, 0, 0, 0, 0) != 0) return fail(12, "stamp flush");
        if (g % 32 == 0) {
            puts_serial("shale-guest: gen ");
            putx(g);
            puts_serial("\n");
        }
    }
}
