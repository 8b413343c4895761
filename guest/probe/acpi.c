/* ACPI: find the RSDP, check and list the tables, read the MADT, find S5. */
#include "probe.h"

#define TABLE_MAX (1u << 20)	/* longer "tables" are garbage: don't sum them */

struct acpi_info acpi;
static u32 table_count;
static bool all_ok;

static u64 fold16(u64 x)
{
	return (x & 0xffff) + (x >> 16 & 0xffff) + (x >> 32 & 0xffff) + (x >> 48);
}

/* Sum of bytes mod 256, eight bytes per step: the low and high bytes of
 * each 16-bit lane are added separately, and the lanes are folded before
 * they can overflow (256 steps * 255 < 65536). */
static u8 sum8(const u8 *p, u32 len)
{
	const u64 m = 0x00ff00ff00ff00ffUL;
	u64 total = 0;

	while (len >= 8) {
		u32 n = len / 8 > 256 ? 256 : len / 8;
		u64 lo = 0, hi = 0;

		len -= n * 8;
		for (; n; n--, p += 8) {
			u64 w = rd64(p);
			lo += w & m;
			hi += (w >> 8) & m;
		}
		total += fold16(lo) + fold16(hi);
	}
	while (len--)
		total += *p++;
	return total;
}

static void sig4(char *out, const u8 *p)
{
	for (int i = 0; i < 4; i++)
		out[i] = p[i] >= 0x20 && p[i] < 0x7f ? p[i] : '?';
	out[4] = 0;
}

/* Check and list one table; returns it if its length is plausible. */
static const u8 *table(u64 addr)
{
	const u8 *t = PHYS(addr);
	char sig[5] = "????";
	u32 len = 0;
	bool ok = false;

	if (addr && addr + 36 <= MAPPED_LIMIT) {
		sig4(sig, t);
		len = rd32(t + 4);
		if (len >= 36 && len <= TABLE_MAX && addr + len <= MAPPED_LIMIT)
			ok = sum8(t, len) == 0;
		else
			t = 0;
	} else {
		t = 0;
	}
	pr("PROBE acpi_table %s %lx %u checksum %s\n", sig, addr, len, ok ? "ok" : "bad");
	table_count++;
	all_ok &= ok;
	return t;
}

static u64 rsdp_scan(void)
{
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (rd64(PHYS(a)) == 0x2052545020445352UL)	/* "RSD PTR " */
			return a;
	return 0;
}

void acpi_report(u64 rsdp, const char *source)
{
	const u8 *r, *root;
	bool xsdt;
	u32 entry, len;

	acpi = (struct acpi_info){ 0 };		/* fresh after a warm reset too */
	table_count = 0;

	if (!rsdp) {
		rsdp = rsdp_scan();
		source = "scan";
	}
	if (!rsdp || rsdp + 36 > MAPPED_LIMIT) {
		pr("PROBE acpi_rsdp none\n");
		pr("PROBE acpi_tables 0\n");
		pr("PROBE acpi_ok no\n");
		return;
	}
	r = PHYS(rsdp);
	all_ok = rd64(r) == 0x2052545020445352UL && sum8(r, 20) == 0;
	if (all_ok && r[15] >= 2)
		all_ok = sum8(r, 36) == 0;
	pr("PROBE acpi_rsdp %lx %s checksum %s\n", rsdp, source, all_ok ? "ok" : "bad");
	if (rd64(r) != 0x2052545020445352UL) {	/* not an RSDP: follow nothing */
		pr("PROBE acpi_tables 0\n");
		pr("PROBE acpi_ok no\n");
		return;
	}
	xsdt = r[15] >= 2 && rd64(r + 24);

	root = table(xsdt ? rd64(r + 24) : rd32(r + 16));
	entry = xsdt ? 8 : 4;
	len = root ? rd32(root + 4) : 0;
	for (u32 off = 36; off + entry <= len; off += entry) {
		const u8 *t = table(xsdt ? rd64(root + off) : rd32(root + off));

		if (!t)
			continue;
		if (rd32(t) == 0x50434146)		/* "FACP" */
			acpi.fadt = t;
		else if (rd32(t) == 0x43495041)		/* "APIC" */
			acpi.madt = t;
	}
	if (acpi.fadt) {
		u32 flen = rd32(acpi.fadt + 4);
		u64 dsdt = flen >= 148 ? rd64(acpi.fadt + 140) : 0;

		acpi.dsdt = table(dsdt ? dsdt : rd32(acpi.fadt + 40));
	}
	pr("PROBE acpi_tables %u\n", table_count);
	pr("PROBE acpi_ok %s\n", all_ok ? "yes" : "no");
}

void madt_report(void)
{
	const u8 *m = acpi.madt;
	u32 len, off;

	acpi.lapic_base = 0xfee00000;
	if (!m) {
		pr("PROBE madt none\n");
		pr("PROBE cpus 1\n");
		return;
	}
	len = rd32(m + 4);
	if (rd32(m + 36))
		acpi.lapic_base = rd32(m + 36);
	/* Processors first, as the listing requires, then the IO APICs. */
	for (int pass = 0; pass < 2; pass++) {
		for (off = 44; off + 2 <= len && m[off + 1] >= 2; off += m[off + 1]) {
			const u8 *e = m + off;
			u32 id;

			if (pass == 1) {
				if (e[0] == 1)
					pr("PROBE madt_ioapic %u %x\n", e[2], rd32(e + 4));
				continue;
			}
			if (e[0] == 0 && (rd32(e + 4) & 1))
				id = e[3];
			else if (e[0] == 9 && (rd32(e + 8) & 1))
				id = rd32(e + 4);
			else
				continue;
			pr("PROBE madt_lapic %u\n", id);
			if (acpi.cpu_count < MAX_CPUS)
				acpi.apic_ids[acpi.cpu_count] = id;
			acpi.cpu_count++;
		}
		if (pass == 0)
			pr("PROBE cpus %u\n", acpi.cpu_count);
	}
}

/* Find the AML name "_S5_"; looks for its '5' eight bytes at a time. */
static const u8 *find_s5_name(const u8 *p, u32 len)
{
	const u64 ones = 0x0101010101010101UL, fives = 0x35 * ones;
	u32 i = 36, j;

	for (; i + 8 <= len; i += 8) {
		u64 x = rd64(p + i) ^ fives;

		if (!((x - ones) & ~x & (ones << 7)))
			continue;		/* no '5' in these eight bytes */
		for (j = i; j < i + 8; j++)
			if (p[j] == '5' && j + 2 <= len && rd32(p + j - 2) == 0x5f35535f)
				return p + j - 2;
	}
	for (j = i; j + 2 <= len; j++)
		if (p[j] == '5' && rd32(p + j - 2) == 0x5f35535f)
			return p + j - 2;
	return 0;
}

/* S5 sleep register and value: SLP_TYP from the DSDT's \_S5_ package. */
bool acpi_find_s5(struct sleep_reg *r)
{
	const u8 *f = acpi.fadt, *q;
	u32 dlen, typ;

	if (!f || !acpi.dsdt)
		return false;
	dlen = rd32(acpi.dsdt + 4);
	q = find_s5_name(acpi.dsdt, dlen);
	/* NameString, PackageOp, PkgLength, NumElements, first element. */
	if (!q || q + 12 > acpi.dsdt + dlen || q[4] != 0x12)
		return false;
	q += 5;
	q += 1 + (*q >> 6);
	q++;
	if (*q == 0x0a || *q == 0x0b)		/* BytePrefix, WordPrefix */
		typ = q[1];
	else if (*q <= 1)			/* ZeroOp, OneOp */
		typ = *q;
	else
		return false;

	r->typ = typ & 7;
	/* FADT 5.0+ SLEEP_CONTROL_REG (hardware-reduced ACPI), else PM1a_CNT. */
	if (rd32(f + 4) >= 256 && rd64(f + 248)) {
		r->space = f[244];
		r->addr = rd64(f + 248);
		r->pm1a = false;
		return r->space <= 1 && r->addr < MAPPED_LIMIT;
	}
	r->space = 1;
	r->addr = rd32(f + 64);
	r->pm1a = true;
	return r->addr != 0;
}

void acpi_sleep(const struct sleep_reg *r)
{
	if (r->pm1a) {
		outw(r->addr, r->typ << 10 | 1 << 13);	/* SLP_TYP, SLP_EN */
	} else {
		u8 v = r->typ << 2 | 1 << 5;		/* SLP_TYP, SLP_EN */

		if (r->space == 1)
			outb(r->addr, v);
		else
			*(volatile u8 *)r->addr = v;
	}
}
