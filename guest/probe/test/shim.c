/* Builds a Linux boot_params page from PVH start_info (see shim.S). */
#include "../probe.h"

#define BOOT_PARAMS 0x7000

bool shim_linux32;

struct start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist, cmdline, rsdp, memmap;
	u32 memmap_entries, reserved;
};

static bool has(const char *s, const char *w)
{
	for (; s && *s; s++) {
		u32 i = 0;

		while (w[i] && s[i] == w[i])
			i++;
		if (!w[i])
			return true;
	}
	return false;
}

u64 shim_main(u32 si_addr)
{
	const struct start_info *si = (const void *)(u64)si_addr;
	const u8 *mm = (const u8 *)si->memmap;
	u8 *bp = (u8 *)BOOT_PARAMS;
	const char *cmd = (const char *)si->cmdline;
	u32 n = si->memmap_entries;

	for (u32 i = 0; i < 4096; i++)
		((volatile u8 *)bp)[i] = 0;
	for (u32 i = 0; i < n; i++)			/* 24-byte -> 20-byte entries */
		for (u32 j = 0; j < 20; j++)
			bp[0x2d0 + 20 * i + j] = mm[24 * i + j];
	bp[0x1e8] = n;
	*(u16 *)(bp + 0x1fe) = 0xaa55;
	*(u32 *)(bp + 0x202) = 0x53726448;		/* "HdrS" */
	*(u32 *)(bp + 0x228) = si->cmdline;
	/* "shim.scan" on the command line: no RSDP, make the probe scan. */
	*(u64 *)(bp + 0x070) = has(cmd, "shim.scan") ? 0 : si->rsdp;
	shim_linux32 = has(cmd, "shim.linux32");
	return BOOT_PARAMS;
}
