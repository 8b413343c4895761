/* Boot-information reporting and command-line actions of the probe. */
#include "probe.h"

struct e820_entry e820[E820_MAX];
u32 e820_count;
static char cmdline[CMDLINE_MAX];

struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};

struct hvm_memmap_entry {
	u64 addr, size;
	u32 type, reserved;
};

/* Offsets in the Linux boot_params ("zero page"). */
#define BP_ACPI_RSDP     0x070
#define BP_EXT_CMDLINE   0x0c8
#define BP_E820_ENTRIES  0x1e8
#define BP_CMDLINE       0x228
#define BP_E820_TABLE    0x2d0

static void copy_cmdline(u64 addr)
{
	const char *s = (const char *)PHYS(addr);
	u32 n = 0;

	if (addr && addr < MAPPED_LIMIT)
		for (; n < CMDLINE_MAX - 1 && s[n]; n++)
			cmdline[n] = s[n];
	cmdline[n] = 0;
}

static void add_e820(u64 addr, u64 size, u32 type)
{
	if (e820_count < E820_MAX)
		e820[e820_count++] = (struct e820_entry){ addr, size, type };
}

/* Copies what the probe needs from start_info; returns the RSDP address. */
static u64 read_start_info(const struct hvm_start_info *si)
{
	copy_cmdline(si->cmdline_paddr);
	if (si->version >= 1 && si->memmap_paddr && si->memmap_paddr < MAPPED_LIMIT) {
		const struct hvm_memmap_entry *m = (const void *)PHYS(si->memmap_paddr);

		for (u32 i = 0; i < si->memmap_entries; i++)
			add_e820(m[i].addr, m[i].size, m[i].type);
	}
	return si->rsdp_paddr;
}

static u64 read_boot_params(const u8 *bp)
{
	const u8 *e = bp + BP_E820_TABLE;

	copy_cmdline((u64)rd32(bp + BP_EXT_CMDLINE) << 32 | rd32(bp + BP_CMDLINE));
	for (u32 i = 0; i < bp[BP_E820_ENTRIES]; i++, e += 20)
		add_e820(rd64(e), rd64(e + 8), rd32(e + 16));
	return rd64(bp + BP_ACPI_RSDP);
}

bool e820_is_ram(u64 addr, u64 size)
{
	for (u32 i = 0; i < e820_count; i++)
		if (e820[i].type == 1 && e820[i].addr <= addr &&
		    addr + size <= e820[i].addr + e820[i].size)
			return true;
	return false;
}

/* True if the space-separated command line holds the word. */
bool has_word(const char *word)
{
	for (const char *p = cmdline; *p;) {
		const char *w = word;

		while (*p == ' ')
			p++;
		while (*w && *p == *w)
			p++, w++;
		if (!*w && (*p == ' ' || !*p))
			return true;
		while (*p && *p != ' ')
			p++;
	}
	return false;
}

/*
 * probe.console_flood=N: N lines of 64 bytes on the console, for the VMM's cap on its
 * console log. Ends with "PROBE console_flood done".
 */
static void console_flood(void)
{
	const char *v = cmdline_arg("probe.console_flood=", 0);
	u64 n = 0;

	if (!v || !parse_num(&v, &n, false))
		return;
	for (u64 i = 0; i < n; i++)
		pr("PROBE flood %lu ..............................................\n", i);
	pr("PROBE console_flood done\n");
}

const char *cmdline_arg(const char *prefix, const char *from)
{
	const char *p = from ? from : cmdline;

	/* A value handed back is inside its word: skip the rest of it. */
	if (from)
		while (*p && *p != ' ')
			p++;
	while (*p) {
		const char *w = prefix;

		while (*p == ' ')
			p++;
		while (*w && *p == *w)
			p++, w++;
		if (!*w)
			return p;
		while (*p && *p != ' ')
			p++;
	}
	return 0;
}

bool parse_num(const char **p, u64 *v, bool suffix)
{
	const char *s = *p;
	u32 base = 10, digits = 0;
	u64 n = 0;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++, digits++) {
		u32 c = *s, d;

		if (c >= '0' && c <= '9')
			d = c - '0';
		else if (base == 16 && (c | 0x20) >= 'a' && (c | 0x20) <= 'f')
			d = (c | 0x20) - 'a' + 10;
		else
			break;
		n = n * base + d;
	}
	if (suffix && (*s == 'K' || *s == 'k'))
		n <<= 10, s++;
	else if (suffix && (*s == 'M' || *s == 'm'))
		n <<= 20, s++;
	else if (suffix && (*s == 'G' || *s == 'g'))
		n <<= 30, s++;
	*p = s;
	*v = n;
	return digits != 0;
}

static void __attribute__((noreturn)) idle(void)
{
	for (;;)
		asm volatile("cli; hlt");
}

void probe_main(u32 kind, u64 info)
{
	static const char *const kinds[] = { "", "pvh", "linux64", "linux32" };
	struct sleep_reg s5;
	bool poweroff, s5_ok = false;
	u64 ram = 0, rsdp;

	pr("PROBE boot %s\n", kinds[kind]);
	/* Copy the boot data first: the AP start-up page may overwrite it. */
	e820_count = 0;
	if (kind == BOOT_PVH)
		rsdp = read_start_info((const void *)PHYS(info));
	else
		rsdp = read_boot_params(PHYS(info));

	pr("PROBE cmdline%s%s\n", cmdline[0] ? " " : "", cmdline);
	for (u32 i = 0; i < e820_count; i++) {
		pr("PROBE e820 %lx %lx %u\n", e820[i].addr, e820[i].size, e820[i].type);
		if (e820[i].type == 1)
			ram += e820[i].size;
	}
	pr("PROBE e820_entries %u\n", e820_count);
	pr("PROBE ram_bytes %lu\n", ram);

	acpi_report(rsdp, kind == BOOT_PVH ? "start_info" : "boot_params");
	madt_report();
	/* Read everything poweroff needs before the APs' page is written. */
	poweroff = has_word("probe.poweroff");
	if (poweroff || has_word("probe.power_button"))
		s5_ok = acpi_find_s5(&s5);
	virtio_find();
	smp_start();
	virtio_report();
	garbage_run();
	blk_run();
	rng_run();
	net_run();
	vsock_run();
	bench_run();
	console_flood();
	churn_run();
	pr("PROBE ready\n");

	if (poweroff) {
		pr("PROBE poweroff\n");
		if (s5_ok)
			acpi_sleep(&s5);
		else
			pr("PROBE error no_s5\n");
	} else if (has_word("probe.power_button")) {
		power_button_wait(s5_ok ? &s5 : 0);
	} else if (has_word("probe.reboot")) {
		pr("PROBE reboot\n");
		outb(0x64, 0xfe);	/* i8042: pulse the reset line */
	} else if (has_word("probe.triplefault")) {
		pr("PROBE triplefault\n");
		crash_triplefault();
	} else if (has_word("probe.badinsn")) {
		pr("PROBE badinsn\n");
		crash_badinsn();
	} else {
		pr("PROBE idle\n");
	}
	idle();
}
