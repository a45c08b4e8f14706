/* Hostile-driver test guest: submits malformed descriptor chains and broken rings, and checks that the device
 * answers with IOERR / no status / DEVICE_NEEDS_RESET as appropriate and keeps working after a reset. Exit code
 * 0 = pass, otherwise the failing step. */
#include "guest_lib.h"

#define WANT (F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_BLK_SIZE | F_SEG_MAX | F_INDIRECT)
#define OUTSIDE_RAM 0x100000000000UL

static volatile struct blk_hdr *hdr0 = (volatile struct blk_hdr *)HDR_AREA;
static volatile u8 *st0 = (volatile u8 *)STATUS_AREA;

static void set_desc(int i, u64 addr, u32 len, u16 flags, u16 next) {
    vq_desc(i)->addr = addr;
    vq_desc(i)->len = len;
    vq_desc(i)->flags = flags;
    vq_desc(i)->next = next;
}

/* Submit head 0 and wait; return the used length (or 0xdead on timeout). */
static u32 submit(struct vq *q) {
    barrier();
    vq_push(q, 0);
    vq_notify(q);
    if (vq_wait(q, 1))
        return 0xdead;
    return *used_len((u16)(q->used_seen - 1) % q->size);
}

static int wait_needs_reset(struct vq *q) {
    for (int i = 0; i < 100000; i++) {
        if (reg_read(q, R_STATUS) & S_NEEDS_RESET)
            return 1;
        for (int j = 0; j < 100; j++) cpu_relax();
    }
    return 0;
}

static int healthy(struct vq *q, u64 sector) {
    u64 buf = DATA_AREA, buf2 = DATA_AREA + 0x10000;
    fill_pattern(buf, sector, 1);
    if (do_req(q, T_OUT, sector, buf, 512, 0) != 0) return 0;
    memset((void *)buf2, 0, 512);
    if (do_req(q, T_IN, sector, buf2, 512, 1) != 0) return 0;
    return check_pattern(buf2, sector, 1);
}

int guest_main(void) {
    struct vq q;
    u64 buf = DATA_AREA;
    puts_serial("shale-guest: hostile test\n");
    if (vq_init(&q, VIRTIO_MMIO_BASE, WANT, 16)) return fail(1, "init");
    if (!healthy(&q, 1)) return fail(2, "baseline");

    /* Data outside RAM: IOERR with status. */
    hdr0->type = T_IN; hdr0->sector = 0; *st0 = 0xff;
    set_desc(0, HDR_AREA, 16, DESC_F_NEXT, 1);
    set_desc(1, OUTSIDE_RAM, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    set_desc(2, STATUS_AREA, 1, DESC_F_WRITE, 0);
    if (submit(&q) != 1 || *st0 != 1) return fail(3, "data outside RAM");

    /* Status outside RAM: returned with used length 0, no status anywhere. */
    set_desc(1, buf, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    set_desc(2, OUTSIDE_RAM, 1, DESC_F_WRITE, 0);
    if (submit(&q) != 0) return fail(4, "status outside RAM");

    /* Short header. */
    *st0 = 0xff;
    set_desc(0, HDR_AREA, 8, DESC_F_NEXT, 2);
    set_desc(2, STATUS_AREA, 1, DESC_F_WRITE, 0);
    if (submit(&q) != 1 || *st0 != 1) return fail(5, "short header");

    /* Readable after writable. */
    *st0 = 0xff;
    hdr0->type = T_OUT;
    set_desc(0, HDR_AREA, 16, DESC_F_NEXT | DESC_F_WRITE, 1);
    set_desc(1, buf, 512, DESC_F_NEXT, 2);
    set_desc(2, STATUS_AREA, 1, DESC_F_WRITE, 0);
    if (submit(&q) != 1 || *st0 != 1) return fail(6, "order");

    /* Descriptor loop 0 -> 1 -> 0: cut off after queue-size descriptors, no writable byte: no status. */
    set_desc(0, HDR_AREA, 16, DESC_F_NEXT, 1);
    set_desc(1, buf, 512, DESC_F_NEXT, 0);
    if (submit(&q) != 0) return fail(7, "loop");

    /* A 4 GiB descriptor. */
    *st0 = 0xff;
    hdr0->type = T_IN;
    set_desc(0, HDR_AREA, 16, DESC_F_NEXT, 1);
    set_desc(1, buf, 0xffffffffu, DESC_F_NEXT | DESC_F_WRITE, 2);
    set_desc(2, STATUS_AREA, 1, DESC_F_WRITE, 0);
    /* The chain is longer than 2^32 bytes in total, which virtio forbids: it is cut short before the status
     * descriptor (used length 0) or refused with IOERR; either way nothing is transferred. */
    {
        u32 l = submit(&q);
        if (!(l == 0 || (l == 1 && *st0 == 1))) return fail(8, "huge descriptor");
    }

    /* A 16 MiB read (inside RAM, over the device's per-request cap). */
    *st0 = 0xff;
    set_desc(1, 0x1000000UL, 16u << 20, DESC_F_NEXT | DESC_F_WRITE, 2);
    if (submit(&q) != 1 || *st0 != 1) return fail(9, "oversized request");

    /* Indirect table outside RAM: nothing usable, returned with no status. */
    set_desc(0, OUTSIDE_RAM, 48, DESC_F_INDIRECT, 0);
    if (submit(&q) != 0) return fail(10, "indirect outside RAM");

    /* A valid request through an indirect table. */
    {
        volatile struct desc *ind = (volatile struct desc *)(DATA_AREA + 0x20000);
        *st0 = 0xff;
        hdr0->type = T_IN; hdr0->sector = 1;
        ind[0].addr = HDR_AREA; ind[0].len = 16; ind[0].flags = DESC_F_NEXT; ind[0].next = 1;
        ind[1].addr = buf; ind[1].len = 512; ind[1].flags = DESC_F_NEXT | DESC_F_WRITE; ind[1].next = 2;
        ind[2].addr = STATUS_AREA; ind[2].len = 1; ind[2].flags = DESC_F_WRITE; ind[2].next = 0;
        set_desc(0, (u64)ind, 48, DESC_F_INDIRECT, 0);
        memset((void *)buf, 0, 512);
        if (submit(&q) != 513 || *st0 != 0 || !check_pattern(buf, 1, 1)) return fail(11, "indirect request");
    }

    /* Byte-wide write to the status register is ignored. */
    *(volatile u8 *)(q.base + R_STATUS) = 0;
    if (!(reg_read(&q, R_STATUS) & S_DRIVER_OK)) return fail(12, "narrow status write took effect");

    /* Head index beyond the queue: the device needs a reset; after it, everything works. */
    *avail_ring(q.avail_idx % q.size) = 1000;
    barrier();
    q.avail_idx++;
    *avail_idx() = q.avail_idx;
    vq_notify(&q);
    if (!wait_needs_reset(&q)) return fail(13, "bad head did not set NEEDS_RESET");
    if (vq_init(&q, VIRTIO_MMIO_BASE, WANT, 16)) return fail(14, "re-init after bad head");
    if (!healthy(&q, 2)) return fail(15, "healthy after bad head");

    /* Avail index running far ahead of the ring. */
    *avail_idx() = (u16)(q.avail_idx + 1000);
    vq_notify(&q);
    if (!wait_needs_reset(&q)) return fail(16, "bad avail idx did not set NEEDS_RESET");
    if (vq_init(&q, VIRTIO_MMIO_BASE, WANT, 16)) return fail(17, "re-init after bad avail idx");
    if (!healthy(&q, 3)) return fail(18, "healthy after bad avail idx");

    /* Rings outside RAM at DRIVER_OK. */
    reg_write(&q, R_STATUS, 0);
    reg_write(&q, R_STATUS, S_ACK | S_DRIVER);
    reg_write(&q, R_DRV_FEATURES_SEL, 1);
    reg_write(&q, R_DRV_FEATURES, 1);
    reg_write(&q, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    reg_write(&q, R_QUEUE_SEL, 0);
    reg_write(&q, R_QUEUE_NUM, 16);
    reg_write(&q, R_DESC_LO, 0); reg_write(&q, R_DESC_HI, 0x1000);
    reg_write(&q, R_QUEUE_READY, 1);
    reg_write(&q, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    if (!(reg_read(&q, R_STATUS) & S_NEEDS_RESET)) return fail(19, "rings outside RAM accepted");

    /* Unoffered feature bit: FEATURES_OK refused. */
    reg_write(&q, R_STATUS, 0);
    reg_write(&q, R_STATUS, S_ACK | S_DRIVER);
    reg_write(&q, R_DRV_FEATURES_SEL, 1);
    reg_write(&q, R_DRV_FEATURES, 1 | (1u << 30));
    reg_write(&q, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (reg_read(&q, R_STATUS) & S_FEATURES_OK) return fail(20, "unoffered feature accepted");

    if (vq_init(&q, VIRTIO_MMIO_BASE, WANT, 16)) return fail(21, "final re-init");
    if (!healthy(&q, 4)) return fail(22, "healthy at the end");
    puts_serial("shale-guest: PASS\n");
    return 0;
}
