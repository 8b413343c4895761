#!/usr/bin/env python3
"""Checks probe.bzImage's setup header against what loaders (linux-loader's
BzImage::load, the Linux boot protocol) need. Usage: check-bzimage.py OUTDIR"""
import struct, sys

out = sys.argv[1]
img = open(f"{out}/probe.bzImage", "rb").read()
flat = open(f"{out}/probe.bin", "rb").read()
end = int([l.split()[0] for l in open(f"{out}/probe.syms") if l.split()[2] == "_end"][0], 16)

def u(off, fmt):
    return struct.unpack_from("<" + fmt, img, off)[0]

setup_sects = u(0x1f1, "B") or 4
setup_len = (setup_sects + 1) * 512
checks = [
    ("boot_flag 0xaa55", u(0x1fe, "H") == 0xAA55),
    ("header HdrS", img[0x202:0x206] == b"HdrS"),
    ("version >= 2.12", u(0x206, "H") >= 0x020C),
    ("loadflags LOADED_HIGH", u(0x211, "B") & 1),
    ("code32_start 1 MiB", u(0x214, "I") == 0x100000),
    ("xloadflags XLF_KERNEL_64", u(0x236, "H") & 1),
    ("pref_address 1 MiB", u(0x258, "Q") == 0x100000),
    ("cmdline_size", u(0x238, "I") >= 255),
    ("kernel_alignment", u(0x230, "I") in (0x100000, 0x200000)),
    ("setup area + flat image", img[setup_len:] == flat),
    ("syssize covers image", u(0x1F4, "I") * 16 >= len(flat)),
    ("init_size covers image and stacks", u(0x260, "I") >= end - 0x100000),
]
bad = [name for name, ok in checks if not ok]
for name, ok in checks:
    print(f"{'ok ' if ok else 'BAD'} {name}")
sys.exit(1 if bad else 0)
