/*
 * Test shim for the probe's Linux 64-bit entry under QEMU, which can only
 * start the probe through PVH. Booted by PVH, it does what a VMM does for
 * the 64-bit boot protocol: long mode with a Linux-style GDT (CS 0x10,
 * DS 0x18) and a 1 GiB identity map, a boot_params page, then a jump to
 * 0x100200 with %rsi = boot_params (or the 32-bit protocol, see below).
 * The probe's flat image must already be at 1 MiB (QEMU: -device
 * loader,file=probe.bin,addr=0x100000,force-raw=on).
 */
	.text
	.code32
	.globl shim_entry
shim_entry:
	movl %ebx, %esi			/* hvm_start_info */
	lgdt gdt_desc
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax		/* PG, PE */
	movl %eax, %cr0
	ljmp $0x10, $1f
	.code64
1:	movl $0x18, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	leaq stack_top(%rip), %rsp
	movl %esi, %edi
	call shim_main
	movq %rax, %rsi
	cmpb $0, shim_linux32(%rip)
	jne 2f
	movq $-1, %rsp			/* the protocol promises no stack */
	movl $0x100200, %eax
	jmp *%rax

	/* "shim.linux32": the 32-bit protocol instead, entered at 1 MiB in
	 * protected mode with paging off, %esi = boot_params, %ebx = 0. */
2:	leaq 3f(%rip), %rax
	pushq $0x20
	pushq %rax
	lretq
	.code32
3:	movl %cr0, %eax
	andl $0x7fffffff, %eax		/* paging off leaves long mode */
	movl %eax, %cr0
	movl $0xc0000080, %ecx
	rdmsr
	andl $~0x100, %eax
	wrmsr
	xorl %ebx, %ebx
	xorl %ebp, %ebp
	xorl %edi, %edi
	movl $0x100000, %eax
	jmp *%eax

	.data
	.p2align 3
gdt:
	.quad 0, 0
	.quad 0x00af9b000000ffff	/* 0x10: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x18: data */
	.quad 0x00cf9b000000ffff	/* 0x20: 32-bit code */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

	.p2align 12
pml4:	.quad pdpt + 3
	.fill 511, 8, 0
pdpt:	.quad pd + 3
	.fill 511, 8, 0
pd:
	.set addr, 0
	.rept 512
	.quad addr + 0x83
	.set addr, addr + 0x200000
	.endr
	.skip 4096
stack_top:

	.section .note.pvh, "a", @note
	.p2align 2
	.long 4, 4, 18
	.asciz "Xen"
	.long shim_entry
	.section .note.GNU-stack, "", @progbits
