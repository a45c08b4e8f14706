/* Minimal Linux userspace for the hardware-only full-boot test: PID 1 from an initramfs, no libc. It prints a
 * marker on the console and stops the VM through the debug-exit port (exit code 0). */
typedef unsigned long u64;

static long sys3(long n, long a, long b, long c) {
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return r;
}

static void say(const char *s) {
    long n = 0;
    while (s[n]) n++;
    sys3(1, 1, (long)s, n); /* write(1, s, n) */
}

void _start(void) {
    say("SHALE-USERSPACE-OK\n");
    if (sys3(173, 0x501, 4, 1) == 0) { /* ioperm(0x501, 4, 1) */
        __asm__ volatile("outl %0, %1" : : "a"(0u), "Nd"((unsigned short)0x501));
    }
    for (;;) sys3(34, 0, 0, 0); /* pause() */
}
