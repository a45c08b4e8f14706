/* Two disks: vda read-write, vdb read-only. vdb must offer VIRTIO_BLK_F_RO, serve reads, and refuse writes with
 * IOERR; vda must keep working. Then the guest spins until the host stops the VM (exercises Vm::stop). */
#include "guest_lib.h"

int guest_main(void) {
    struct vq q;
    u64 buf = DATA_AREA, buf2 = DATA_AREA + 0x10000;
    if (vq_init(&q, VIRTIO_MMIO_BASE + 0x1000, F_VERSION_1 | F_RO | F_FLUSH, 16)) return fail(1, "init vdb");
    if (!(q.features & F_RO)) return fail(2, "vdb not read-only");
    if (do_req(&q, T_IN, 0, buf2, 512, 1) != 0 || !check_pattern(buf2, 0, 1)) return fail(3, "vdb read");
    fill_pattern(buf, 5, 1);
    if (do_req(&q, T_OUT, 5, buf, 512, 0) != 1) return fail(4, "vdb write not refused");
    reg_write(&q, R_STATUS, 0);
    if (vq_init(&q, VIRTIO_MMIO_BASE, F_VERSION_1 | F_RO | F_FLUSH, 16)) return fail(5, "init vda");
    if (q.features & F_RO) return fail(6, "vda read-only");
    if (do_req(&q, T_OUT, 5, buf, 512, 0) != 0) return fail(7, "vda write");
    puts_serial("shale-guest: multi PASS, spinning\n");
    for (;;) cpu_relax();
}
