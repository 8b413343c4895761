/*
 * A minimal user mode (ring 3) for the benchmarks: a GDT with user segments
 * and a TSS, exception entry stubs, and user_run, which runs a C function in
 * ring 3 and comes back when it ends (its `ud2`) or faults.
 *
 * Ring 3 runs natively on the PVM host; only the two transitions per call
 * are ring-0 work. Interrupts stay off in ring 3 (RFLAGS.IF = 0).
 */
#include "probe.h"

#define TSS_RSP0     4			/* offset of RSP0 in the 64-bit TSS */
#define RFLAGS_USER  0x2		/* IF = 0, IOPL = 0 */

/* ---- u64 user_run(u64 (*fn)(void *), void *arg, void *stack_top) -------- */
	.text
	.globl user_run
user_run:
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	/* An exception from ring 3 switches to RSP0: just below this frame. */
	movq %rsp, user_tss + TSS_RSP0(%rip)
	pushq $SEL_UDATA
	pushq %rdx
	pushq $RFLAGS_USER
	pushq $SEL_UCODE
	leaq user_start(%rip), %rax
	pushq %rax
	iretq

/* Ring 3: %rdi = fn, %rsi = its argument; fn's result stays in %rax. */
user_start:
	movq %rdi, %rax
	movq %rsi, %rdi
	call *%rax
	.globl user_exit
user_exit:
	ud2				/* #UD: back to ring 0, see exc_common */

/* ---- exception entry: vectors 0-31 --------------------------------------- */
/* One 16-byte stub per vector: the error code (0 where the CPU pushes none),
 * the vector, then the common path. */
	.p2align 4
	.globl exc_stubs
exc_stubs:
	.set vec, 0
	.rept 32
	.p2align 4
	.if vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30
	.else
	pushq $0
	.endif
	pushq $vec
	jmp exc_common
	.set vec, vec + 1
	.endr

/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. From ring 3 this is
 * the RSP0 stack, right below user_run's frame: unwind to it and return
 * from user_run, with fn's result (a ud2 at user_exit) or USER_FAULT (any
 * other exception, recorded in user_fault). From ring 0 it is a bug in the
 * probe: kernel_fault reports it. */
exc_common:
	testb $3, 24(%rsp)
	jz 1f
	cmpq $6, (%rsp)
	jne 2f
	leaq user_exit(%rip), %rcx
	cmpq %rcx, 16(%rsp)
	je 3f
2:	movq (%rsp), %rcx
	movq %rcx, user_fault(%rip)		/* vector */
	movq 8(%rsp), %rcx
	movq %rcx, user_fault + 8(%rip)		/* error code */
	movq 16(%rsp), %rcx
	movq %rcx, user_fault + 16(%rip)	/* RIP */
	movq %cr2, %rcx
	movq %rcx, user_fault + 24(%rip)	/* CR2 */
	movq $USER_FAULT, %rax
3:	/* Ring 3 left null data segments and the exception a null SS. */
	movl $SEL_DATA, %ecx
	movl %ecx, %ds
	movl %ecx, %es
	movl %ecx, %ss
	movq user_tss + TSS_RSP0(%rip), %rsp
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	ret
1:	movq (%rsp), %rdi
	movq 8(%rsp), %rsi
	movq 16(%rsp), %rdx
	andq $-16, %rsp
	call kernel_fault			/* does not return */

/* ---- tables --------------------------------------------------------------- */
	.data
	.p2align 4
	.globl user_gdt
user_gdt:	/* the probe's GDT (entry.S) followed by the user mode entries */
	.quad 0
	.quad 0x00af9b000000ffff	/* SEL_CODE64 */
	.quad 0x00cf93000000ffff	/* SEL_DATA */
	.quad 0x00cf9b000000ffff	/* SEL_CODE32 */
	.quad 0x00cff3000000ffff	/* SEL_UDATA: data, DPL 3 */
	.quad 0x00affb000000ffff	/* SEL_UCODE: 64-bit code, DPL 3 */
	.quad 0, 0			/* SEL_TSS: 16 bytes, written by user_init */
user_gdt_end:
	.p2align 3
	.globl user_gdt_desc
user_gdt_desc:
	.word user_gdt_end - user_gdt - 1
	.quad user_gdt

	.p2align 4
	.globl user_idt
user_idt:
	.fill 32 * 16, 1, 0		/* written by user_init */
	.p2align 3
	.globl user_idt_desc
user_idt_desc:
	.word 32 * 16 - 1
	.quad user_idt

	.p2align 4
	.globl user_tss
user_tss:	/* 64-bit TSS: RSP0 at 4; I/O map base at 102 (written by user_init) */
	.fill 104, 1, 0

	.p2align 3
	.globl user_fault
user_fault:
	.quad 0, 0, 0, 0
