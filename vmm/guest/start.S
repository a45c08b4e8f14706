/* Entry point of the Shale test guest. The VMM enters here in 64-bit mode with paging on (identity map of the
 * first 4 GiB), %rsp set to a valid stack, %rdi = RAM size. main()'s return value goes to the debug-exit port,
 * which stops the VM with that exit code. */
    .section .text.start, "ax"
    .globl _start
_start:
    cld
    mov $0x80000, %rsp
    call guest_main
    mov $0x501, %dx
    out %eax, %dx
1:  cli
    hlt
    jmp 1b

    .section .note.GNU-stack, "", @progbits
