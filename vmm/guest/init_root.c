/* Two-stage Linux userspace for the hardware-only "boot to a virtio-blk root disk" test. No libc: raw syscalls.
 *
 * Stage 1 (PID 1 from the initramfs, which holds /modules): mount devtmpfs, load the virtio modules Debian builds
 * as modules (virtio_ring, virtio, virtio_mmio, virtio_blk; the disk is found through the VMM's ACPI DSDT), wait
 * for /dev/vda, mount it (ext4) on /newroot, move it over / and exec /sbin/init from the disk.
 * Stage 2 (/sbin/init on the disk, the same binary): print the disk's /marker, write /from-guest, sync (a flush
 * down to the Shale volume), and stop the VM through the debug-exit port with code 0. Any failure prints
 * "SHALE-ROOT-FAIL <step>" and exits with code 1. */
typedef unsigned long u64;

static long sys6(long n, long a, long b, long c, long d, long e) {
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8) : "rcx", "r11", "memory");
    return r;
}
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0)

enum { SYS_read = 0, SYS_write = 1, SYS_open = 2, SYS_close = 3, SYS_access = 21, SYS_nanosleep = 35,
       SYS_execve = 59, SYS_chdir = 80, SYS_mkdir = 83, SYS_chroot = 161, SYS_sync = 162, SYS_mount = 165,
       SYS_ioperm = 173, SYS_pause = 34, SYS_finit_module = 313 };
#define O_RDONLY 0
#define O_WRONLY 1
#define O_CREAT 0100
#define O_TRUNC 01000
#define MS_MOVE 8192

static long len(const char *s) { long n = 0; while (s[n]) n++; return n; }
static void say(const char *s) { sys3(SYS_write, 1, s, len(s)); }

static void leave(unsigned code) {
    if (sys3(SYS_ioperm, 0x501, 4, 1) == 0) {
        __asm__ volatile("outl %0, %1" : : "a"(code), "Nd"((unsigned short)0x501));
    }
    for (;;) sys3(SYS_pause, 0, 0, 0);
}

static void fail(const char *step) {
    say("SHALE-ROOT-FAIL ");
    say(step);
    say("\n");
    leave(1);
}

static void stage1(void) {
    static const char *mods[] = {"/modules/virtio_ring.ko", "/modules/virtio.ko", "/modules/virtio_mmio.ko",
                                 "/modules/virtio_blk.ko"};
    sys3(SYS_mkdir, "/dev", 0755, 0);
    if (sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0) < 0) fail("mount devtmpfs");
    for (unsigned i = 0; i < sizeof mods / sizeof mods[0]; i++) {
        long fd = sys3(SYS_open, mods[i], O_RDONLY, 0);
        if (fd < 0) fail(mods[i]);
        if (sys3(SYS_finit_module, fd, "", 0) < 0) fail(mods[i]);
        sys3(SYS_close, fd, 0, 0);
    }
    /* The disk appears once virtio_blk has probed the ACPI-enumerated transport: poll for up to 30 s. */
    struct { long s, ns; } tenth = {0, 100000000};
    int i;
    for (i = 0; i < 300 && sys3(SYS_access, "/dev/vda", 0, 0) != 0; i++) sys3(SYS_nanosleep, &tenth, 0, 0);
    if (i == 300) fail("no /dev/vda");
    sys3(SYS_mkdir, "/newroot", 0755, 0);
    if (sys6(SYS_mount, (long)"/dev/vda", (long)"/newroot", (long)"ext4", 0, 0) < 0) fail("mount /dev/vda");
    if (sys3(SYS_chdir, "/newroot", 0, 0) < 0) fail("chdir");
    if (sys6(SYS_mount, (long)".", (long)"/", 0, MS_MOVE, 0) < 0) fail("move root");
    if (sys3(SYS_chroot, ".", 0, 0) < 0) fail("chroot");
    sys3(SYS_chdir, "/", 0, 0);
    say("SHALE-ROOT-MOUNTED\n");
    static char *argv[] = {"/sbin/init", 0};
    static char *envp[] = {0};
    sys3(SYS_execve, "/sbin/init", argv, envp);
    fail("exec /sbin/init");
}

static void stage2(void) {
    char buf[128];
    long fd = sys3(SYS_open, "/marker", O_RDONLY, 0);
    if (fd < 0) fail("open /marker");
    long n = sys3(SYS_read, fd, buf, sizeof buf - 1);
    if (n <= 0) fail("read /marker");
    buf[n] = 0;
    sys3(SYS_close, fd, 0, 0);
    say("SHALE-ROOT-OK ");
    say(buf);
    say("\n");
    fd = sys3(SYS_open, "/from-guest", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) fail("create /from-guest");
    static const char msg[] = "written by the guest on its virtio-blk root\n";
    if (sys3(SYS_write, fd, msg, sizeof msg - 1) != (long)(sizeof msg - 1)) fail("write /from-guest");
    sys3(SYS_close, fd, 0, 0);
    sys3(SYS_sync, 0, 0, 0);
    leave(0);
}

void _start(void) {
    if (sys3(SYS_access, "/modules", 0, 0) == 0) stage1();
    stage2();
}
