/*
 * Ring 3 for the benchmarks: the TSS and IDT, the U bit on the pages ring 3
 * uses, and the probe's IDT put back afterwards (user_run and the exception
 * stubs are in ring3.S). All of it is ring-0 work, emulated on the PVM host,
 * so it is done once and kept short.
 */
#include "probe.h"

#define CR4_SMEP  (1UL << 20)
#define CR4_SMAP  (1UL << 21)
#define PTE_USER  4UL
#define PTE_ADDR  0x000ffffffffff000UL
#define PAGE_2M   0x200000UL
#define TSS_LIMIT 103
#define TSS_IOMAP 102			/* offset of the I/O map base in the TSS */

extern u8 user_gdt[], user_idt[], user_tss[], exc_stubs[];
extern const u8 user_gdt_desc[], user_idt_desc[];
void kernel_fault(u64 vector, u64 error, u64 rip) __attribute__((noreturn));

static struct { u16 limit; u64 base; } __attribute__((packed)) saved_idt;
static bool ready;

static u64 *table(u64 entry)
{
	return (u64 *)(entry & PTE_ADDR);
}

/* The probe's page tables (identity map of 0-4 GiB, entry.S) from CR3. */
static u64 *pdpt(void)
{
	u64 cr3;

	asm volatile("mov %%cr3, %0" : "=r"(cr3));
	return table(table(cr3)[0]);
}

void user_init(void)
{
	u64 tss = (u64)user_tss, cr4, *d = (u64 *)(user_gdt + SEL_TSS), cr3;

	if (ready)
		return;
	ready = true;
	/* Ring 0 touches user pages (the image among them). */
	asm volatile("mov %%cr4, %0" : "=r"(cr4));
	if (cr4 & (CR4_SMEP | CR4_SMAP))
		asm volatile("mov %0, %%cr4" : : "r"(cr4 & ~(CR4_SMEP | CR4_SMAP)));
	/* Available 64-bit TSS (type 9), present, DPL 0; no I/O map. */
	d[0] = TSS_LIMIT | (tss & 0xffffff) << 16 | 0x89UL << 40 | (tss >> 24 & 0xff) << 56;
	d[1] = tss >> 32;
	*(u16 *)(user_tss + TSS_IOMAP) = TSS_LIMIT + 1;
	/* Interrupt gates, DPL 0, to the stubs. */
	for (u32 v = 0; v < 32; v++) {
		u64 h = (u64)exc_stubs + 16 * v, *g = (u64 *)(user_idt + 16 * v);

		g[0] = (h & 0xffff) | (u64)SEL_CODE64 << 16 | 0x8eUL << 40 | (h >> 16 & 0xffff) << 48;
		g[1] = h >> 32;
	}
	asm volatile("sidt %0" : "=m"(saved_idt));
	asm volatile("lgdt %0\n\tltr %w1\n\tlidt %2"
		     : : "m"(*user_gdt_desc), "r"(SEL_TSS), "m"(*user_idt_desc) : "memory");
	/* U on the upper levels; the 2 MiB pages decide (user_map). */
	asm volatile("mov %%cr3, %0" : "=r"(cr3));
	table(cr3)[0] |= PTE_USER;
	for (u32 i = 0; i < 4; i++)
		pdpt()[i] |= PTE_USER;
}

void user_map(u64 addr, u64 size)
{
	u64 *p = pdpt(), cr3;

	for (u64 a = addr & ~(PAGE_2M - 1); a < addr + size && a < MAPPED_LIMIT; a += PAGE_2M)
		table(p[a >> 30])[a >> 21 & 511] |= PTE_USER;
	asm volatile("mov %%cr3, %0\n\tmov %0, %%cr3" : "=&r"(cr3) : : "memory");
}

void user_fini(void)
{
	asm volatile("lidt %0" : : "m"(saved_idt));
}

/* An exception in ring 0 while the probe's IDT is loaded: a probe bug. */
void kernel_fault(u64 vector, u64 error, u64 rip)
{
	pr("PROBE fault %lu error %lx rip %lx\n", vector, error, rip);
	for (;;)
		asm volatile("cli; hlt");
}
