/* Freestanding helpers for the Shale test guest: port I/O, MMIO, serial output, and a minimal virtio-mmio
 * virtio-blk driver with polling. Addresses match shale_vmm::layout. */
#ifndef SHALE_GUEST_H
#define SHALE_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define DEBUG_EXIT_PORT 0x501
#define COM1 0x3f8

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

static inline void putc_serial(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {}
    outb(COM1, (u8)c);
}
static inline void puts_serial(const char *s) { while (*s) putc_serial(*s++); }
static inline void putx(u64 v) {
    char buf[19]; int i = 18; buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x'; buf[--i] = '0';
    puts_serial(&buf[i]);
}

/* virtio-mmio registers */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INT_STATUS 0x060
#define R_INT_ACK 0x064
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_SEG_MAX (1UL << 2)
#define F_RO (1UL << 5)
#define F_BLK_SIZE (1UL << 6)
#define F_FLUSH (1UL << 9)
#define F_DISCARD (1UL << 13)
#define F_WRITE_ZEROES (1UL << 14)
#define F_INDIRECT (1UL << 28)
#define F_EVENT_IDX (1UL << 29)
#define F_VERSION_1 (1UL << 32)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4

struct desc { u64 addr; u32 len; u16 flags; u16 next; } __attribute__((packed));
struct blk_hdr { u32 type; u32 ioprio; u64 sector; } __attribute__((packed));
struct blk_range { u64 sector; u32 num; u32 flags; } __attribute__((packed));

/* Fixed guest-physical layout of the driver's structures (all identity mapped). */
#define QSIZE 256
#define DESC_TABLE 0x200000UL
#define AVAIL_RING 0x204000UL
#define USED_RING 0x205000UL
#define HDR_AREA 0x210000UL   /* per-slot headers, 16 bytes each */
#define STATUS_AREA 0x218000UL /* per-slot status bytes */
#define DATA_AREA 0x400000UL  /* per-slot data buffers */

struct vq {
    u64 base;
    u16 size;
    u16 avail_idx;  /* next avail index we publish */
    u16 used_seen;  /* used entries consumed */
    u64 features;
};

static inline volatile struct desc *vq_desc(int i) { return (volatile struct desc *)(DESC_TABLE + 16UL * i); }
static inline volatile u16 *avail_flags(void) { return (volatile u16 *)AVAIL_RING; }
static inline volatile u16 *avail_idx(void) { return (volatile u16 *)(AVAIL_RING + 2); }
static inline volatile u16 *avail_ring(int i) { return (volatile u16 *)(AVAIL_RING + 4 + 2UL * i); }
static inline volatile u16 *used_idx(void) { return (volatile u16 *)(USED_RING + 2); }
static inline volatile u32 *used_id(int i) { return (volatile u32 *)(USED_RING + 4 + 8UL * i); }
static inline volatile u32 *used_len(int i) { return (volatile u32 *)(USED_RING + 8 + 8UL * i); }
/* With EVENT_IDX: used_event lives after the avail ring, avail_event after the used ring. */
static inline volatile u16 *used_event(u16 size) { return (volatile u16 *)(AVAIL_RING + 4 + 2UL * size); }

static inline u32 reg_read(struct vq *q, u32 off) { return mmio_read32(q->base + off); }
static inline void reg_write(struct vq *q, u32 off, u32 v) { mmio_write32(q->base + off, v); }

/* Bring the device up with `want` features (masked by what it offers). Returns 0 or a negative step. */
static inline int vq_init(struct vq *q, u64 base, u64 want, u16 size) {
    q->base = base;
    if (reg_read(q, R_MAGIC) != 0x74726976 || reg_read(q, R_VERSION) != 2 || reg_read(q, R_DEVICE_ID) != 2)
        return -1;
    reg_write(q, R_STATUS, 0);
    reg_write(q, R_STATUS, S_ACK);
    reg_write(q, R_STATUS, S_ACK | S_DRIVER);
    reg_write(q, R_DEV_FEATURES_SEL, 0);
    u64 offered = reg_read(q, R_DEV_FEATURES);
    reg_write(q, R_DEV_FEATURES_SEL, 1);
    offered |= (u64)reg_read(q, R_DEV_FEATURES) << 32;
    q->features = offered & want;
    reg_write(q, R_DRV_FEATURES_SEL, 0);
    reg_write(q, R_DRV_FEATURES, (u32)q->features);
    reg_write(q, R_DRV_FEATURES_SEL, 1);
    reg_write(q, R_DRV_FEATURES, (u32)(q->features >> 32));
    reg_write(q, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(reg_read(q, R_STATUS) & S_FEATURES_OK))
        return -2;
    reg_write(q, R_QUEUE_SEL, 0);
    if (reg_read(q, R_QUEUE_NUM_MAX) < size)
        return -3;
    memset((void *)DESC_TABLE, 0, 0x6000);
    reg_write(q, R_QUEUE_NUM, size);
    reg_write(q, R_DESC_LO, (u32)DESC_TABLE);
    reg_write(q, R_DESC_HI, 0);
    reg_write(q, R_AVAIL_LO, (u32)AVAIL_RING);
    reg_write(q, R_AVAIL_HI, 0);
    reg_write(q, R_USED_LO, (u32)USED_RING);
    reg_write(q, R_USED_HI, 0);
    reg_write(q, R_QUEUE_READY, 1);
    reg_write(q, R_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    q->size = size;
    q->avail_idx = 0;
    q->used_seen = 0;
    return 0;
}

/* Publish chain head `head` (does not notify). */
static inline void vq_push(struct vq *q, u16 head) {
    *avail_ring(q->avail_idx % q->size) = head;
    barrier();
    q->avail_idx++;
    *avail_idx() = q->avail_idx;
    barrier();
}

static inline void vq_notify(struct vq *q) { reg_write(q, R_QUEUE_NOTIFY, 0); }

/* Wait until `n` more used entries appear; returns 0, or -1 on timeout (the device looks dead). */
static inline int vq_wait(struct vq *q, u16 n) {
    u64 spins = 0;
    u16 target = (u16)(q->used_seen + n);
    while ((u16)(*used_idx() - target) & 0x8000) {
        cpu_relax();
        if (++spins > 20000000UL)
            return -1;
    }
    q->used_seen = target;
    return 0;
}

#endif
