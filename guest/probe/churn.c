/*
 * probe.churn=SIZE: keep SIZE bytes of memory changing at a chosen rate,
 * check all of it, and measure how long the guest stood still.
 *
 * For pauses, snapshots, upgrades and migrations: the test stops the guest
 * under the churn and the probe proves from inside that nothing was lost
 * and says for how long it did not run. Ring 3 (native on the PVM host)
 * does the work; ring 0 prints between its runs.
 *
 * Memory, from CHURN_MEM: a table of one 64-bit generation per page, then
 * the data pages. Data page p holds mix(p, gen[p]) ^ w in its word w. The
 * loop rewrites a page every time its quota says so (probe.churn_rate=N
 * pages per ms, default 1; 0 keeps the memory still after its first fill),
 * watches the TSC between its turns, and checks every page at the end of
 * each report period and at once after a gap: a lost, stale or foreign page
 * breaks the formula. The TSC is calibrated against the local APIC timer
 * (KVM runs it at 1 GHz).
 *
 *   PROBE churn start <pages> tsc_khz <k>
 *   PROBE churn gap <us>                  a stall: at least GAP_US in ring 3, or at
 *                                         least AWAY_US around ring 0's printing
 *   PROBE churn check ok <pages>          after a gap (every period too, silently)
 *   PROBE churn check bad <page> <word>   the first wrong word; the churn ends
 *   PROBE churn tick <n> written <pages> max_gap_us <us>   every period (probe.churn_report_ms, default 1000)
 */
#include "probe.h"

#define CHURN_MEM    0x2000000UL	/* 32 MiB */
#define USER_STACK   (CHURN_MEM - 0x1000)
#define PAGE         4096UL
#define GAP_US       1000UL		/* a stall in ring 3 (probe.churn_gap_us) */
#define AWAY_US      50000UL		/* a stall around ring 0's printing */
#define LAPIC_SVR    0x0f0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_NOW  0x390
#define LAPIC_TIMER_DIV  0x3e0

extern const u8 _start[], _end[];

struct churn {
	u64 *gen;			/* per data page */
	u64 *data;
	u64 pages, rate_per_ms;
	u64 tsc_khz, gap_ticks, period_ticks, ticks_per_page;
	u64 next;			/* the page to rewrite next */
	u64 left, away_ticks;		/* when ring 3 last returned; a stall in ring 0 */
	/* out of ring 3 */
	u64 written, max_gap, last_gap, bad_page, bad_word;
	bool bad;
};

static struct churn c;
static u64 user_stack[512] __attribute__((aligned(16)));

static u64 mix(u64 page, u64 gen)
{
	u64 x = page * 0x9e3779b97f4a7c15UL ^ (gen + 1) * 0xc2b2ae3d27d4eb4fUL;

	return x ^ x >> 29;
}

static void fill(u64 p)
{
	u64 v = mix(p, c.gen[p]), *w = c.data + p * (PAGE / 8);

	for (u64 i = 0; i < PAGE / 8; i++)
		w[i] = v ^ i;
}

/* Ring 3: every page against its generation; false at the first bad word. */
static bool check_all(void)
{
	for (u64 p = 0; p < c.pages; p++) {
		u64 v = mix(p, c.gen[p]), *w = c.data + p * (PAGE / 8);

		for (u64 i = 0; i < PAGE / 8; i++)
			if (w[i] != (v ^ i)) {
				c.bad = true;
				c.bad_page = p;
				c.bad_word = i;
				return false;
			}
	}
	return true;
}

/* Ring 3: churn until the period ends or a gap was seen. */
static u64 churn_loop(void *arg)
{
	u64 start = rdtsc(), prev = start, due = start;

	(void)arg;
	c.last_gap = 0;
	/* Ring 0 prints between the runs, emulated and slow: a stall there shows only
	 * when the whole time away is far longer than printing ever takes. */
	if (c.left && start - c.left >= c.away_ticks) {
		c.last_gap = start - c.left;
		c.left = 0;	/* reported once */
		return 0;
	}
	for (;;) {
		u64 now = rdtsc(), gap = now - prev;

		prev = now;
		if (gap > c.max_gap)
			c.max_gap = gap;
		if (gap >= c.gap_ticks) {
			c.last_gap = gap;
			c.left = rdtsc();
			return 0;
		}
		if (now - start >= c.period_ticks) {
			c.left = rdtsc();
			return 0;
		}
		if (c.rate_per_ms && (long)(now - due) >= 0) {
			c.gen[c.next]++;
			fill(c.next);
			c.written++;
			c.next = c.next + 1 == c.pages ? 0 : c.next + 1;
			due += c.ticks_per_page;
		}
	}
}

static u64 check_loop(void *arg)
{
	(void)arg;
	return check_all();
}

static u64 init_loop(void *arg)
{
	(void)arg;
	for (u64 p = 0; p < c.pages; p++) {
		c.gen[p] = 0;
		fill(p);
	}
	return 0;
}

/* TSC ticks per ms, against the LAPIC timer counting down at 1 GHz. */
static u64 tsc_khz(void)
{
	volatile u32 *lapic = (volatile u32 *)(u64)acpi.lapic_base;
	u32 before, after;
	u64 t0, t1;

	lapic[LAPIC_SVR / 4] = 0x1ff;		/* enabled, spurious vector 0xff */
	lapic[LAPIC_TIMER_DIV / 4] = 0xb;	/* divide by 1 */
	lapic[LAPIC_LVT_TIMER / 4] = 1 << 16;	/* masked, one-shot */
	lapic[LAPIC_TIMER_INIT / 4] = 0xffffffff;
	before = lapic[LAPIC_TIMER_NOW / 4];
	t0 = rdtsc();
	while (rdtsc() - t0 < 20 * TSC_MS)
		;
	after = lapic[LAPIC_TIMER_NOW / 4];
	t1 = rdtsc();
	lapic[LAPIC_TIMER_INIT / 4] = 0;
	if (before <= after)
		return TSC_MS / 1000;
	/* ns elapsed = counts; kHz = ticks / ms. */
	return (t1 - t0) * 1000000UL / (before - after);
}

static u64 arg_or(const char *prefix, u64 dflt, bool suffix)
{
	const char *v = cmdline_arg(prefix, 0);
	u64 n;

	return v && parse_num(&v, &n, suffix) ? n : dflt;
}

static u64 us(u64 ticks)
{
	return ticks * 1000 / c.tsc_khz;
}

/* Checks every page; says so when it is asked to or something is wrong. */
static bool run_check(bool say_ok)
{
	u64 r = user_run(check_loop, 0, user_stack + 512);

	if (r == 1) {
		if (say_ok)
			pr("PROBE churn check ok %lu\n", c.pages);
		return true;
	}
	if (r == (u64)USER_FAULT)
		pr("PROBE churn error fault %lu rip %lx addr %lx\n", user_fault.vector,
		   user_fault.rip, user_fault.cr2);
	else
		pr("PROBE churn check bad %lu %lu\n", c.bad_page, c.bad_word);
	return false;
}

void churn_run(void)
{
	u64 size = arg_or("probe.churn=", 0, true), ticks = 0, table_pages;

	if (!size)
		return;
	c.rate_per_ms = arg_or("probe.churn_rate=", 1, false);
	c.tsc_khz = tsc_khz();
	c.gap_ticks = arg_or("probe.churn_gap_us=", GAP_US, false) * c.tsc_khz / 1000;
	c.away_ticks = AWAY_US * c.tsc_khz / 1000;
	c.ticks_per_page = c.rate_per_ms ? c.tsc_khz / c.rate_per_ms : 0;
	c.period_ticks = arg_or("probe.churn_report_ms=", 1000, false) * c.tsc_khz;
	c.pages = size / PAGE;
	table_pages = (c.pages * 8 + PAGE - 1) / PAGE;
	if (!c.pages || !e820_is_ram(CHURN_MEM, (c.pages + table_pages) * PAGE)) {
		pr("PROBE churn error memory\n");
		return;
	}
	c.gen = (u64 *)CHURN_MEM;
	c.data = (u64 *)(CHURN_MEM + table_pages * PAGE);
	user_init();
	user_map((u64)_start, _end - _start);
	user_map(CHURN_MEM, (c.pages + table_pages) * PAGE);
	user_run(init_loop, 0, user_stack + 512);
	pr("PROBE churn start %lu tsc_khz %lu\n", c.pages, c.tsc_khz);
	for (;;) {
		c.max_gap = 0;
		if (user_run(churn_loop, 0, user_stack + 512) == (u64)USER_FAULT) {
			pr("PROBE churn error fault %lu rip %lx addr %lx\n", user_fault.vector,
			   user_fault.rip, user_fault.cr2);
			break;
		}
		if (c.last_gap)
			pr("PROBE churn gap %lu\n", us(c.last_gap));
		else
			pr("PROBE churn tick %lu written %lu max_gap_us %lu\n", ++ticks,
			   c.written, us(c.max_gap));
		if (!run_check(c.last_gap != 0))
			break;
	}
	user_fini();
}
