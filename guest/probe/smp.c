/* Start the APs listed in the MADT: INIT, SIPI, and a bounded wait. */
#include "probe.h"

#define LAPIC_ID      0x020
#define LAPIC_ICR_LO  0x300
#define LAPIC_ICR_HI  0x310
#define ICR_INIT      0x00004500	/* INIT, level assert */
#define ICR_SIPI      0x00004600	/* start-up, vector = page number */

#define TSC_SIPI_AGAIN 10000000UL	/* 10 ms at 1 GHz: resend SIPI */
#define TSC_GIVE_UP  2000000000UL	/* 2 s at 1 GHz */

static u32 aps_up;
extern u32 ap_slots;			/* next AP stack slot, see entry.S */

static volatile u32 *lapic(u32 reg)
{
	return (volatile u32 *)(u64)(acpi.lapic_base + reg);
}

/* The in-kernel LAPIC delivers at once, so the delivery status bit is not
 * polled (each read would be another exit). */
static void send_ipi(u32 apic_id, u32 icr)
{
	*lapic(LAPIC_ICR_HI) = apic_id << 24;
	*lapic(LAPIC_ICR_LO) = icr;
}

/* AP in long mode on its own stack, called from entry.S. */
void ap_main(void)
{
	pr("PROBE ap %u up\n", *lapic(LAPIC_ID) >> 24);
	__atomic_fetch_add(&aps_up, 1, __ATOMIC_RELEASE);
}

static void send_all(const u32 *ids, u32 n, u32 icr)
{
	for (u32 i = 0; i < n; i++)
		send_ipi(ids[i], icr);
}

void smp_start(void)
{
	u32 ids[MAX_CPUS], n = 0, bsp, limit;
	u64 t0;
	bool again = false;

	aps_up = 0;
	ap_slots = 0;
	if (!acpi.madt) {
		pr("PROBE cpus_up 1\n");
		return;
	}
	bsp = *lapic(LAPIC_ID) >> 24;
	pr("PROBE bsp_apic %u\n", bsp);
	limit = acpi.cpu_count < MAX_CPUS ? acpi.cpu_count : MAX_CPUS;
	for (u32 i = 0; i < limit && n < MAX_CPUS - 1; i++)
		if (acpi.apic_ids[i] != bsp && acpi.apic_ids[i] < 255)
			ids[n++] = acpi.apic_ids[i];
	if (!n) {
		pr("PROBE cpus_up 1\n");
		return;
	}
	/* Boot data was copied out before; the page only has to be RAM. */
	if (!e820_is_ram(TRAMP_PAGE, 4096)) {
		pr("PROBE error tramp_page_not_ram\n");
		pr("PROBE cpus_up 1\n");
		return;
	}
	memcpy((void *)TRAMP_PAGE, tramp_start, tramp_end - tramp_start);

	send_all(ids, n, ICR_INIT);
	send_all(ids, n, ICR_SIPI | TRAMP_PAGE >> 12);
	t0 = rdtsc();
	while (__atomic_load_n(&aps_up, __ATOMIC_ACQUIRE) < n) {
		u64 dt = rdtsc() - t0;

		if (dt > TSC_GIVE_UP)
			break;
		if (dt > TSC_SIPI_AGAIN && !again) {
			/* CPUs already running ignore a second SIPI. */
			send_all(ids, n, ICR_SIPI | TRAMP_PAGE >> 12);
			again = true;
		}
		asm volatile("pause");
	}
	pr("PROBE cpus_up %u\n", 1 + __atomic_load_n(&aps_up, __ATOMIC_ACQUIRE));
}
