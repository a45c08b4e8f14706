/* Benchmark guest: keeps DEPTH 4 KiB requests in flight until TOTAL have completed, refilling each slot as its
 * request completes, and notifies the device only when it asks to be notified (EVENT_IDX avail_event, or the
 * used ring's NO_NOTIFY flag without EVENT_IDX). Polls the used ring; never takes interrupts. Compile-time
 * knobs: -DDEPTH=n -DTOTAL=n -DWRITE=0/1 -DEVENT_IDX=0/1. Exit code 0 = all requests succeeded. */
#include "guest_lib.h"

#ifndef DEPTH
#define DEPTH 32
#endif
#ifndef TOTAL
#define TOTAL 4000
#endif
#ifndef WRITE
#define WRITE 1
#endif
#ifndef EVENT_IDX
#define EVENT_IDX 1
#endif

#if DEPTH > 80
#error "DEPTH must fit three descriptors per slot in a 256-entry queue"
#endif

static u16 last_kick;

static void kick(struct vq *q) {
    u16 new_idx = q->avail_idx;
    int need;
    if (q->features & F_EVENT_IDX) {
        u16 ev = *(volatile u16 *)(USED_RING + 4 + 8UL * q->size);
        need = (u16)(new_idx - ev - 1) < (u16)(new_idx - last_kick);
    } else {
        need = !(*(volatile u16 *)USED_RING & 1);
    }
    last_kick = new_idx;
    if (need)
        vq_notify(q);
}

static void submit(struct vq *q, int slot, u32 n) {
    u64 sector = ((u64)n * 8) % 2000;
    req_prepare(q, slot, WRITE ? T_OUT : T_IN, sector, DATA_AREA + 4096UL * slot, 4096, !WRITE);
}

int guest_main(void) {
    struct vq q;
    u64 want = F_VERSION_1 | F_FLUSH | (EVENT_IDX ? F_EVENT_IDX : 0);
    if (vq_init(&q, VIRTIO_MMIO_BASE, want, QSIZE)) return fail(1, "init");
    /* We poll: ask for no used-buffer interrupts (EVENT_IDX: used_event far behind; else NO_INTERRUPT flag). */
    *used_event(q.size) = 0x8000;
    *avail_flags() = (q.features & F_EVENT_IDX) ? 0 : 1;
    u32 submitted = 0, completed = 0;
    for (int s = 0; s < DEPTH && submitted < TOTAL; s++)
        submit(&q, s, submitted++);
    kick(&q);
    u64 spins = 0;
    while (completed < TOTAL) {
        u16 used = *used_idx();
        if (used == q.used_seen) {
            cpu_relax();
            if (++spins > 200000000UL) return fail(2, "device stalled");
            continue;
        }
        while (q.used_seen != used) {
            u32 head = *used_id(q.used_seen % q.size);
            q.used_seen++;
            int slot = (int)(head / 3);
            if (req_status(slot) != 0) return fail(3, "request failed");
            completed++;
            if (submitted < TOTAL)
                submit(&q, slot, submitted++);
        }
        *used_event(q.size) = (u16)(q.used_seen + 0x8000);
        kick(&q);
    }
    return 0;
}
