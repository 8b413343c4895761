/*
 * probe.power_button: wait for the ACPI power button, then power off through S5.
 * The button is Keel's generic event device (ACPI0013 in the DSDT): its interrupt
 * comes through the IO APIC; the handler reads the GED's event register (read
 * clears it), and bit 0 means the button was pressed. Only this path enables
 * interrupts: the IDT here has the GED vector and the spurious vector, nothing else.
 */
#include "probe.h"

#define GED_VECTOR	0x30
#define SERIAL_VECTOR	0x31
#define COM1_IRQ	4
#define COM1_RBR	0x3f8
#define COM1_IER	0x3f9
#define COM1_MCR	0x3fc
#define COM1_LSR	0x3fd
#define SPURIOUS_VECTOR	0xff
#define IOAPIC_BASE	0xfec00000ul
#define LAPIC_BASE	0xfee00000ul
#define LAPIC_TPR	0x080
#define LAPIC_EOI	0x0b0
#define LAPIC_SVR	0x0f0
#define GED_EVENT_POWER_BUTTON 1

static u8 idt[256 * 16] __attribute__((aligned(16)));
static struct { u16 limit; u64 base; } __attribute__((packed)) idt_desc;
static u64 ged_register;
static volatile u32 button_pressed;
/* Bytes received on COM1 while waiting, reported as `PROBE serial_in XX` lines. */
static volatile u8 serial_rx[64];
static volatile u32 serial_rx_head;

/* Interrupt entry: save the registers C may clobber, call power_irq, return. The
 * CPU's 5-word frame plus 9 pushes keep the stack 16-byte aligned for the call. */
asm(".text\n"
    ".globl power_isr\n"
    "power_isr:\n"
    "	push %rax; push %rcx; push %rdx; push %rsi; push %rdi\n"
    "	push %r8; push %r9; push %r10; push %r11\n"
    "	cld\n"
    "	call power_irq\n"
    "	pop %r11; pop %r10; pop %r9; pop %r8\n"
    "	pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
    "	iretq\n"
    ".globl serial_isr\n"
    "serial_isr:\n"
    "	push %rax; push %rcx; push %rdx; push %rsi; push %rdi\n"
    "	push %r8; push %r9; push %r10; push %r11\n"
    "	cld\n"
    "	call serial_irq\n"
    "	pop %r11; pop %r10; pop %r9; pop %r8\n"
    "	pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rax\n"
    "	iretq\n"
    ".globl spurious_isr\n"
    "spurious_isr:\n"
    "	iretq\n");
extern char power_isr[], serial_isr[], spurious_isr[];

/* Takes what COM1 has received; the waiting loop prints it. */
static void serial_drain(void)
{
	while (inb(COM1_LSR) & 1) {
		serial_rx[serial_rx_head % sizeof(serial_rx)] = inb(COM1_RBR);
		serial_rx_head++;
	}
}

void serial_irq(void);
void serial_irq(void)
{
	serial_drain();
	*(volatile u32 *)(LAPIC_BASE + LAPIC_EOI) = 0;
}

void power_irq(void);
void power_irq(void)
{
	u8 events = *(volatile u8 *)ged_register;

	*(volatile u32 *)(LAPIC_BASE + LAPIC_EOI) = 0;
	if (events & GED_EVENT_POWER_BUTTON)
		button_pressed = 1;
}

static void set_gate(u32 vector, u64 handler, u16 cs)
{
	u8 *g = idt + 16 * vector;
	u64 lo = (handler & 0xffff) | ((u64)cs << 16) | (0x8eull << 40) |
		 ((handler & 0xffff0000ull) << 32);
	u64 hi = handler >> 32;

	__builtin_memcpy(g, &lo, 8);
	__builtin_memcpy(g + 8, &hi, 8);
}

static void ioapic_write(u32 reg, u32 value)
{
	*(volatile u32 *)IOAPIC_BASE = reg;
	*(volatile u32 *)(IOAPIC_BASE + 0x10) = value;
}

/* The GED from the DSDT: its register (OperationRegion GDST in system memory)
 * and its interrupt (the first Extended IRQ descriptor after "ACPI0013"). */
static bool find_ged(u32 *irq)
{
	const u8 *d = acpi.dsdt;
	u32 len, i;
	bool have_irq = false;

	if (!d)
		return false;
	len = rd32(d + 4);
	ged_register = 0;
	for (i = 36; i + 12 <= len; i++) {
		/* OpRegionOp "GDST" SystemMemory DWordPrefix <address> */
		if (d[i] == 0x5b && d[i + 1] == 0x80 && !__builtin_memcmp(d + i + 2, "GDST", 4) &&
		    d[i + 6] == 0x00 && d[i + 7] == 0x0c)
			ged_register = rd32(d + i + 8);
		if (!have_irq && !__builtin_memcmp(d + i, "ACPI0013", 8)) {
			for (u32 j = i + 8; j + 9 <= len; j++) {
				if (d[j] == 0x89 && d[j + 1] == 0x06 && d[j + 2] == 0x00) {
					*irq = rd32(d + j + 5);
					have_irq = true;
					break;
				}
			}
		}
	}
	return ged_register && have_irq && *irq < 24;
}

void power_button_wait(const struct sleep_reg *s5)
{
	u32 irq = 0, bsp = *(volatile u32 *)(LAPIC_BASE + 0x20) >> 24;
	u16 cs;

	if (!find_ged(&irq)) {
		pr("PROBE power_button none\n");
		return;
	}
	asm volatile("mov %%cs, %0" : "=r"(cs));
	set_gate(GED_VECTOR, (u64)power_isr, cs);
	set_gate(SERIAL_VECTOR, (u64)serial_isr, cs);
	set_gate(SPURIOUS_VECTOR, (u64)spurious_isr, cs);
	idt_desc.limit = sizeof(idt) - 1;
	idt_desc.base = (u64)idt;
	asm volatile("lidt %0" : : "m"(idt_desc));
	/* The legacy PICs stay silent; the local APIC takes interrupts. */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	*(volatile u32 *)(LAPIC_BASE + LAPIC_TPR) = 0;
	*(volatile u32 *)(LAPIC_BASE + LAPIC_SVR) = 0x100 | SPURIOUS_VECTOR;
	/* Pin irq: fixed delivery, physical destination, edge, active high, unmasked. */
	ioapic_write(0x11 + 2 * irq, bsp << 24);
	ioapic_write(0x10 + 2 * irq, GED_VECTOR);
	/* COM1 receive interrupts (OUT2 gates the 8250's interrupt line). */
	ioapic_write(0x11 + 2 * COM1_IRQ, bsp << 24);
	ioapic_write(0x10 + 2 * COM1_IRQ, SERIAL_VECTOR);
	outb(COM1_MCR, 0x08);
	outb(COM1_IER, 0x01);
	/* Bytes that came before the interrupt was enabled wait in the UART: take them once. */
	serial_drain();
	pr("PROBE power_button waiting irq %u\n", irq);
	/* A press before the pin was unmasked raised no interrupt, but its event bit
	 * waits in the register: look once. */
	button_pressed = *(volatile u8 *)ged_register & GED_EVENT_POWER_BUTTON;
	u32 serial_rx_tail = 0;
	for (;;) {
		for (; serial_rx_tail != serial_rx_head; serial_rx_tail++)
			pr("PROBE serial_in %x\n", serial_rx[serial_rx_tail % sizeof(serial_rx)]);
		if (button_pressed)
			break;
		asm volatile("sti; hlt; cli" : : : "memory");
	}
	pr("PROBE power_button pressed\n");
	if (s5)
		acpi_sleep(s5);
	else
		pr("PROBE error no_s5\n");
}
