#ifndef GUEST_LIB_H
#define GUEST_LIB_H
#include "shale_guest.h"
void req_prepare(struct vq *q, int s, u32 type, u64 sector, u64 data, u32 dlen, int device_writes);
u8 req_status(int s);
u8 do_req(struct vq *q, u32 type, u64 sector, u64 data, u32 dlen, int device_writes);
u8 pattern(u64 sector, u32 i);
void fill_pattern(u64 buf, u64 sector, u32 sectors);
int check_pattern(u64 buf, u64 sector, u32 sectors);
int check_zero(u64 buf, u32 len);
u64 config_capacity(struct vq *q);
int fail(int step, const char *what);
#endif
