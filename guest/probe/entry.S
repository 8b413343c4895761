/*
 * Entry points, mode switches, page tables and the AP start-up code.
 *
 * Ring-0 code is emulated one instruction at a time on the PVM host, so the
 * paths here are straight-line and all tables are pre-built at link time.
 */
#include "probe.h"

#define COM1        0x3f8
#define CR0_PE      0x00000001
#define CR0_NW      0x20000000
#define CR0_CD      0x40000000
#define CR0_PG      0x80000000
#define CR4_PAE     0x20
#define MSR_EFER    0xc0000080
#define EFER_LME    0x100

/* "PROBE start\n", byte by byte: it must appear before any set-up, and
 * the serial port needs no initialisation. Clobbers %al and %dx only, so
 * the boot registers (%ebx, %esi) survive. Same encoding in 32/64-bit. */
.macro say_start
	movw $COM1, %dx
	.irp c, 0x50,0x52,0x4f,0x42,0x45,0x20,0x73,0x74,0x61,0x72,0x74,0x0a
	movb $\c, %al
	outb %al, %dx
	.endr
.endm

/* ---- 32-bit entry, offset 0 (0x100000) ---------------------------------- */
	.section .text.entry32, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	say_start
	cli
	/* PVH passes start_info in %ebx; the Linux 32-bit protocol passes
	 * boot_params in %esi with %ebx = 0. */
	movl $BOOT_LINUX32, %edi
	cmpl $PVH_MAGIC, (%ebx)
	jne enter_long
	movl $BOOT_PVH, %edi
	movl %ebx, %esi

/* 32-bit protected mode, paging off -> long mode with the probe's tables.
 * In: %edi = boot kind (BOOT_AP for APs), %esi = boot info pointer. */
enter_long:
	lgdt gdt_desc
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	andl $~(CR0_CD | CR0_NW), %eax	/* APs come out of INIT with caches off */
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $SEL_CODE64, $long_entry

/* APs arrive here from the trampoline, protected mode, real-mode data
 * segment bases still cached: reload them before touching memory. */
	.globl ap_entry32
ap_entry32:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	xorl %edi, %edi			/* BOOT_AP */
	jmp enter_long

/* ---- 64-bit entry, offset 0x200 (Linux 64-bit boot protocol) ------------ */
	.section .text.entry64, "ax"
	.code64
	.globl linux64_entry
linux64_entry:
	say_start
	cli
	/* Already in long mode on the loader's GDT and page tables: switch to
	 * ours, which also map the LAPIC and ACPI areas below 4 GiB. */
	lgdt gdt_desc(%rip)
	leaq pml4(%rip), %rax
	movq %rax, %cr3
	leaq bsp_stack_top(%rip), %rsp
	movl $BOOT_LINUX64, %edi	/* %rsi = boot_params, kept */
	pushq $SEL_CODE64
	leaq long_entry(%rip), %rax
	pushq %rax
	lretq

/* Common 64-bit path; %edi = boot kind, %esi = boot info pointer (the
 * boot data is always below 4 GiB). */
long_entry:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl %edi, %edi			/* upper halves are undefined after 32->64 */
	movl %esi, %esi
	cld
	testl %edi, %edi
	jz ap_long
	leaq bsp_stack_top(%rip), %rsp
	call probe_main
	jmp halt_forever

/* Each AP takes the next free stack slot; extra CPUs just halt. */
ap_long:
	movl $1, %eax
	lock xaddl %eax, ap_slots(%rip)
	cmpl $(MAX_CPUS - 1), %eax
	jae halt_forever
	leal 1(%rax), %ecx
	shll $STACK_SHIFT, %ecx
	leaq ap_stacks(%rip), %rsp
	addq %rcx, %rsp
	call ap_main
halt_forever:
	cli
	hlt
	jmp halt_forever

/* ---- deliberate crashes (command-line switches) ------------------------- */
	.text
	.globl crash_triplefault
crash_triplefault:
	lidt empty_idt(%rip)		/* limit 0: every exception escalates */
	ud2

	/* The only SIMD instruction in the probe (make check knows it): the
	 * PVM host cannot emulate it in ring 0 and fails the VM. */
	.globl crash_badinsn
crash_badinsn:
	.byte 0x66, 0x0f, 0xef, 0xc0	/* pxor %xmm0, %xmm0 */
	jmp halt_forever

/* ---- AP real-mode start-up, copied to TRAMP_PAGE ------------------------ */
	.section .tramp, "a"
	.code16
tramp:
	cli
	movw %cs, %ax			/* CS = TRAMP_PAGE >> 4 after SIPI */
	movw %ax, %ds
	lgdtl tramp_gdt_desc - tramp
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $ap_entry32
	.p2align 2
tramp_gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt

/* ---- data ---------------------------------------------------------------- */
	.section .rodata
	.p2align 3
empty_idt:
	.word 0
	.quad 0

	.data
	.p2align 4
gdt:	/* accessed bits preset so the CPU never writes the descriptors */
	.quad 0
	.quad 0x00af9b000000ffff	/* SEL_CODE64 */
	.quad 0x00cf93000000ffff	/* SEL_DATA */
	.quad 0x00cf9b000000ffff	/* SEL_CODE32 */
gdt_end:
	.p2align 3
gdt_desc:	/* 64-bit base; lgdt in 32-bit mode reads the low half */
	.word gdt_end - gdt - 1
	.quad gdt

	.globl ap_slots
ap_slots:
	.long 0

/* Identity map of 0-4 GiB with 2 MiB pages. 3-4 GiB, the usual 32-bit
 * MMIO hole (virtio-mmio devices, IOAPIC, LAPIC, firmware), is uncached
 * (PCD|PWT); the probe uses no RAM there. */
#define PTE_RW      0x003
#define PDE_2M      0x083
#define PDE_UC      0x018
#define UC_START    0xc0000000
	.section .data.pagetables, "aw"
	.p2align 12
pml4:
	.quad pdpt + PTE_RW
	.fill 511, 8, 0
pdpt:
	.quad pd + PTE_RW, pd + 0x1000 + PTE_RW, pd + 0x2000 + PTE_RW, pd + 0x3000 + PTE_RW
	.fill 508, 8, 0
pd:
	.set addr, 0
	.rept 2048
	.if addr >= UC_START
	.quad addr + PDE_2M + PDE_UC
	.else
	.quad addr + PDE_2M
	.endif
	.set addr, addr + 0x200000
	.endr

	.section .stack, "aw", @nobits
	.p2align 12
	.globl ap_stacks
ap_stacks:
	.skip (MAX_CPUS - 1) << STACK_SHIFT	/* AP slot n: the n-th 4 KiB */
	.skip BSP_STACK
bsp_stack_top:

/* ---- PVH ELF note -------------------------------------------------------- */
	.section .note.pvh, "a", @note
	.p2align 2
	.long 4				/* name size: "Xen\0" */
	.long 4				/* descriptor size */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_entry
