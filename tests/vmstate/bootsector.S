    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    inb $0x92, %al          # fast A20
    or $2, %al
    and $0xfe, %al
    outb %al, $0x92
    lgdtl gdtdesc - _start + 0x7c00
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(pm - _start + 0x7c00)
    .code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x7c00, %esp
    xor %ebx, %ebx
outer:
    inc %ebx
    mov %ebx, 0x500            # sweep counter at guest-phys 0x500
    mov $0x01000000, %edi      # dirty 16..24 MiB: one dword per page, position moves each sweep
inner:
    mov %ebx, %eax
    shl $2, %eax
    and $0xffc, %eax
    mov %ebx, (%edi,%eax)
    add $0x1000, %edi
    cmp $0x01800000, %edi
    jb inner
    jmp outer
    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
gdtdesc:
    .word 23
    .long gdt - _start + 0x7c00
    .org 510
    .word 0xaa55
