/* Functional virtio-blk test guest: negotiates features, writes patterned sectors, flushes, reads back and
 * verifies, discards, writes zeroes, and checks IOERR/UNSUPP for bad requests. Exit code 0 = pass, otherwise
 * the failing step. The host then checks the data through the BlockDevice:
 *   sectors 0..8: pattern; 64..72: pattern (two-segment write); 16..24: discarded (zero);
 *   32..40: write-zeroed; 100..101: pattern. */
#include "guest_lib.h"

int guest_main(void) {
    struct vq q;
    u64 buf = DATA_AREA, buf2 = DATA_AREA + 0x10000;
    puts_serial("shale-guest: blk test\n");
    int r = vq_init(&q, VIRTIO_MMIO_BASE, F_VERSION_1 | F_FLUSH | F_DISCARD | F_WRITE_ZEROES | F_BLK_SIZE | F_SEG_MAX, 16);
    if (r) return fail(1, "virtio init");
    if ((q.features & (F_FLUSH | F_DISCARD | F_WRITE_ZEROES)) != (F_FLUSH | F_DISCARD | F_WRITE_ZEROES))
        return fail(2, "features missing");
    u64 cap = config_capacity(&q);
    puts_serial("capacity ");
    putx(cap);
    puts_serial("\n");
    if (cap < 256) return fail(3, "capacity");

    /* Completions raise the interrupt line (irqfd) and set InterruptStatus; ACK clears it. */
    reg_write(&q, R_INT_ACK, reg_read(&q, R_INT_STATUS));
    if (do_req(&q, T_FLUSH, 0, 0, 0, 0) != 0) return fail(27, "flush before interrupt check");
    if (!(reg_read(&q, R_INT_STATUS) & 1)) return fail(28, "no used-buffer interrupt status");
    reg_write(&q, R_INT_ACK, 1);
    if (reg_read(&q, R_INT_STATUS) & 1) return fail(29, "interrupt ACK did not clear");

    /* GET_ID */
    memset((void *)buf, 0, 32);
    if (do_req(&q, T_GET_ID, 0, buf, 20, 1) != 0) return fail(4, "get_id status");
    if (memcpy((void *)buf2, "shale-test", 10), 0) {}
    for (int i = 0; i < 10; i++)
        if (((u8 *)buf)[i] != ((u8 *)buf2)[i]) return fail(5, "get_id value");

    /* Write 8 sectors at 0, and sectors 16..40 (to be discarded / zeroed later). */
    fill_pattern(buf, 0, 8);
    if (do_req(&q, T_OUT, 0, buf, 4096, 0) != 0) return fail(6, "write 0");
    fill_pattern(buf, 16, 24);
    if (do_req(&q, T_OUT, 16, buf, 24 * 512, 0) != 0) return fail(7, "write 16");
    fill_pattern(buf, 100, 1);
    if (do_req(&q, T_OUT, 100, buf, 512, 0) != 0) return fail(8, "write 100");

    /* Two-segment write at sector 64: header, 2 KiB, 2 KiB, status. */
    fill_pattern(buf, 64, 8);
    {
        volatile struct blk_hdr *h = (volatile struct blk_hdr *)HDR_AREA;
        volatile u8 *st = (volatile u8 *)STATUS_AREA;
        h->type = T_OUT; h->ioprio = 0; h->sector = 64; *st = 0xff;
        vq_desc(0)->addr = HDR_AREA; vq_desc(0)->len = 16; vq_desc(0)->flags = DESC_F_NEXT; vq_desc(0)->next = 5;
        vq_desc(5)->addr = buf; vq_desc(5)->len = 2048; vq_desc(5)->flags = DESC_F_NEXT; vq_desc(5)->next = 7;
        vq_desc(7)->addr = buf + 2048; vq_desc(7)->len = 2048; vq_desc(7)->flags = DESC_F_NEXT; vq_desc(7)->next = 2;
        vq_desc(2)->addr = STATUS_AREA; vq_desc(2)->len = 1; vq_desc(2)->flags = DESC_F_WRITE; vq_desc(2)->next = 0;
        vq_push(&q, 0);
        vq_notify(&q);
        if (vq_wait(&q, 1) || *st != 0) return fail(9, "two-segment write");
    }

    if (do_req(&q, T_FLUSH, 0, 0, 0, 0) != 0) return fail(10, "flush");

    /* Read back and verify. */
    memset((void *)buf2, 0, 8192);
    if (do_req(&q, T_IN, 0, buf2, 4096, 1) != 0) return fail(11, "read 0");
    if (!check_pattern(buf2, 0, 8)) return fail(12, "verify 0");
    memset((void *)buf2, 0, 8192);
    if (do_req(&q, T_IN, 64, buf2, 4096, 1) != 0) return fail(13, "read 64");
    if (!check_pattern(buf2, 64, 8)) return fail(14, "verify 64");
    /* The used length of a read counts data + status. */
    if (*used_len((q.used_seen - 1) % q.size) != 4097) return fail(15, "used len");

    /* Discard 16..24 and write-zeroes 32..40, then read them as zeroes. */
    {
        volatile struct blk_range *rg = (volatile struct blk_range *)buf;
        rg->sector = 16; rg->num = 8; rg->flags = 0;
        if (do_req(&q, T_DISCARD, 0, buf, 16, 0) != 0) return fail(16, "discard");
        rg->sector = 32; rg->num = 8; rg->flags = 1;
        if (do_req(&q, T_WRITE_ZEROES, 0, buf, 16, 0) != 0) return fail(17, "write zeroes");
    }
    memset((void *)buf2, 0xaa, 4096);
    if (do_req(&q, T_IN, 16, buf2, 4096, 1) != 0 || !check_zero(buf2, 4096)) return fail(18, "discarded range");
    memset((void *)buf2, 0xaa, 4096);
    if (do_req(&q, T_IN, 32, buf2, 4096, 1) != 0 || !check_zero(buf2, 4096)) return fail(19, "zeroed range");
    memset((void *)buf2, 0, 4096);
    if (do_req(&q, T_IN, 24, buf2, 4096, 1) != 0 || !check_pattern(buf2, 24, 8)) return fail(20, "neighbour of discard");

    /* Bad requests: out of range, straddling the end, unsupported type. */
    if (do_req(&q, T_IN, cap, buf2, 512, 1) != 1) return fail(21, "read past end not IOERR");
    if (do_req(&q, T_OUT, cap - 1, buf, 1024, 0) != 1) return fail(22, "write straddling end not IOERR");
    if (do_req(&q, 99, 0, 0, 0, 0) != 2) return fail(23, "unknown type not UNSUPP");
    if (do_req(&q, T_IN, 0, buf2, 100, 1) != 1) return fail(24, "partial sector not IOERR");

    /* Still healthy afterwards. */
    if (do_req(&q, T_IN, 100, buf2, 512, 1) != 0 || !check_pattern(buf2, 100, 1)) return fail(25, "read after errors");
    if (do_req(&q, T_FLUSH, 0, 0, 0, 0) != 0) return fail(26, "final flush");
    puts_serial("shale-guest: PASS\n");
    return 0;
}
