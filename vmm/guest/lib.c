/* Library routines gcc may call even with -ffreestanding, plus request helpers shared by the test guests. */
#include "shale_guest.h"
#include "guest_lib.h"

void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

/* Fill slot `s`'s descriptors for a request and publish it (no notify). `dlen` may be 0 (no data descriptor). */
void req_prepare(struct vq *q, int s, u32 type, u64 sector, u64 data, u32 dlen, int device_writes) {
    volatile struct blk_hdr *h = (volatile struct blk_hdr *)(HDR_AREA + 16UL * s);
    volatile u8 *st = (volatile u8 *)(STATUS_AREA + s);
    h->type = type;
    h->ioprio = 0;
    h->sector = sector;
    *st = 0xff;
    int d0 = 3 * s;
    vq_desc(d0)->addr = (u64)h;
    vq_desc(d0)->len = 16;
    vq_desc(d0)->flags = DESC_F_NEXT;
    int last = d0;
    if (dlen) {
        vq_desc(d0)->next = d0 + 1;
        vq_desc(d0 + 1)->addr = data;
        vq_desc(d0 + 1)->len = dlen;
        vq_desc(d0 + 1)->flags = DESC_F_NEXT | (device_writes ? DESC_F_WRITE : 0);
        last = d0 + 1;
    }
    vq_desc(last)->next = d0 + 2;
    vq_desc(d0 + 2)->addr = (u64)st;
    vq_desc(d0 + 2)->len = 1;
    vq_desc(d0 + 2)->flags = DESC_F_WRITE;
    vq_desc(d0 + 2)->next = 0;
    barrier();
    vq_push(q, (u16)d0);
}

u8 req_status(int s) { return *(volatile u8 *)(STATUS_AREA + s); }

/* One synchronous request in slot 0. Returns the status byte, 0xee on timeout. */
u8 do_req(struct vq *q, u32 type, u64 sector, u64 data, u32 dlen, int device_writes) {
    req_prepare(q, 0, type, sector, data, dlen, device_writes);
    vq_notify(q);
    if (vq_wait(q, 1))
        return 0xee;
    return req_status(0);
}

u8 pattern(u64 sector, u32 i) { return (u8)(sector * 7 + i * 13 + 1); }

void fill_pattern(u64 buf, u64 sector, u32 sectors) {
    for (u32 s = 0; s < sectors; s++)
        for (u32 i = 0; i < 512; i++)
            ((u8 *)buf)[s * 512 + i] = pattern(sector + s, i);
}

int check_pattern(u64 buf, u64 sector, u32 sectors) {
    for (u32 s = 0; s < sectors; s++)
        for (u32 i = 0; i < 512; i++)
            if (((u8 *)buf)[s * 512 + i] != pattern(sector + s, i))
                return 0;
    return 1;
}

int check_zero(u64 buf, u32 len) {
    for (u32 i = 0; i < len; i++)
        if (((u8 *)buf)[i])
            return 0;
    return 1;
}

u64 config_capacity(struct vq *q) {
    return (u64)mmio_read32(q->base + R_CONFIG) | ((u64)mmio_read32(q->base + R_CONFIG + 4) << 32);
}

int fail(int step, const char *what) {
    puts_serial("FAIL step ");
    putx((u64)step);
    puts_serial(": ");
    puts_serial(what);
    puts_serial("\n");
    return step;
}
