#!/usr/bin/env python3
"""Extract the uncompressed ELF kernel (vmlinux) from an x86 bzImage.

Used by guest/linux/build.sh.

    extract-vmlinux.py --probe BZIMAGE      print the payload's compression format
    extract-vmlinux.py BZIMAGE VMLINUX      write VMLINUX and print key=value facts

The compressed payload is located through the setup header fields payload_offset
(boot_params 0x248) and payload_length (0x24c), which count from the start of the
protected-mode code at (setup_sects + 1) * 512. Images whose header predates those
fields (boot protocol < 2.08) are handled by scanning for compression magics.

Decompression runs the ordinary command-line tool for the format (xz, zstd, gzip,
lz4, ...); when it is missing this exits with status 3 and names the tool on stderr
as `missing-tool: NAME` so the caller can install it.

Exit status: 0 ok, 1 bad input / verification failed, 2 usage, 3 missing tool.
"""

import os
import shutil
import struct
import subprocess
import sys
import tempfile

# name -> (magic at payload start, decompress command, whether the kernel build
# appended a 4-byte little-endian uncompressed size after the compressed stream)
FORMATS = [
    ("gzip", b"\x1f\x8b\x08", ["gzip", "-dc"], False),
    ("xz", b"\xfd7zXZ\x00", ["xz", "-dc", "--single-stream"], True),
    ("zstd", b"\x28\xb5\x2f\xfd", ["zstd", "-dcq"], True),
    ("lz4", b"\x02\x21\x4c\x18", ["lz4", "-dc"], True),
    ("bzip2", b"BZh", ["bzip2", "-dc"], True),
    ("lzma", b"\x5d\x00\x00", ["xz", "-dc", "--format=lzma"], True),
    ("lzo", b"\x89LZO\x00", ["lzop", "-dc"], True),
]

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
PT_NOTE = 4
SHT_NOTE = 7
XEN_ELFNOTE_PHYS32_ENTRY = 0x12


class Failure(Exception):
    pass


class MissingTool(Exception):
    pass


def u8(b, off):
    return b[off]


def u16(b, off):
    return struct.unpack_from("<H", b, off)[0]


def u32(b, off):
    return struct.unpack_from("<I", b, off)[0]


def read_setup_header(image):
    """Return (protocol version, protected-mode start, payload offset, payload length)."""
    if len(image) < 0x260:
        raise Failure("file too small to be a bzImage (%d bytes)" % len(image))
    if image[0x202:0x206] != b"HdrS":
        raise Failure("no 'HdrS' setup header signature at 0x202: not an x86 bzImage")
    if u16(image, 0x1FE) != 0xAA55:
        raise Failure("boot sector signature 0xAA55 missing at 0x1fe: not an x86 bzImage")
    version = u16(image, 0x206)
    setup_sects = u8(image, 0x1F1) or 4
    pm_start = (setup_sects + 1) * 512
    if version >= 0x208:
        return version, pm_start, u32(image, 0x248), u32(image, 0x24C)
    return version, pm_start, None, None


def format_of(data):
    for fmt in FORMATS:
        if data.startswith(fmt[1]):
            return fmt
    return None


def locate_payload(image):
    """Return (format tuple, payload bytes or None when found by scanning, start offset)."""
    version, pm_start, off, length = read_setup_header(image)
    if off is not None and length:
        start = pm_start + off
        end = start + length
        if end > len(image):
            raise Failure(
                "payload_offset/payload_length (0x%x/0x%x) point past the end of the file"
                % (off, length)
            )
        payload = image[start:end]
        fmt = format_of(payload)
        if fmt is None:
            raise Failure(
                "unknown compression magic %s at payload start 0x%x"
                % (payload[:6].hex(), start)
            )
        return fmt, payload, start
    # Boot protocol before 2.08: scan the protected-mode part for a known magic.
    for pos in range(pm_start, len(image) - 8):
        fmt = format_of(image[pos:pos + 8])
        if fmt is not None:
            return fmt, None, pos
    raise Failure("boot protocol %x.%02x has no payload fields and no compressed "
                  "stream was found" % (version >> 8, version & 0xFF))


def decompress(fmt, payload, exact=True):
    """Decompress; with exact=False trailing bytes after the stream are tolerated."""
    name, _magic, cmd, size_appended = fmt
    if shutil.which(cmd[0]) is None:
        raise MissingTool(cmd[0])
    expected = None
    if exact and size_appended and len(payload) > 4:
        expected = u32(payload, len(payload) - 4)
        payload = payload[:-4]
    proc = subprocess.run(cmd, input=payload, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout
    if proc.returncode != 0 and (exact or not out.startswith(ELF_MAGIC)):
        raise Failure("%s failed (status %d): %s"
                      % (" ".join(cmd), proc.returncode, proc.stderr.decode(errors="replace").strip()))
    if expected is not None and len(out) != expected:
        raise Failure("%s payload decompressed to %d bytes, the image says %d"
                      % (name, len(out), expected))
    return out


def check_elf(elf):
    if not elf.startswith(ELF_MAGIC):
        raise Failure("decompressed payload is not an ELF file (starts with %s)" % elf[:4].hex())
    if elf[4] != ELFCLASS64 or elf[5] != ELFDATA2LSB:
        raise Failure("decompressed kernel is not a little-endian ELF64 file")
    machine = u16(elf, 18)
    if machine != EM_X86_64:
        raise Failure("decompressed kernel is for ELF machine %d, not x86-64 (62)" % machine)


def iter_notes(elf):
    """Yield (name, type, desc) of every note in PT_NOTE segments (SHT_NOTE sections as fallback)."""
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", elf, 0x36)
    areas = []
    for i in range(e_phnum):
        ph = e_phoff + i * e_phentsize
        if u32(elf, ph) == PT_NOTE:
            off, _vaddr, _paddr, filesz = struct.unpack_from("<QQQQ", elf, ph + 8)
            areas.append((off, filesz))
    if not areas:
        for i in range(e_shnum):
            sh = e_shoff + i * e_shentsize
            if u32(elf, sh + 4) == SHT_NOTE:
                off, size = struct.unpack_from("<QQ", elf, sh + 0x18)
                areas.append((off, size))
    for off, size in areas:
        pos, end = off, off + size
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            pos += 12
            name = elf[pos:pos + namesz].rstrip(b"\x00")
            pos += (namesz + 3) & ~3
            desc = elf[pos:pos + descsz]
            pos += (descsz + 3) & ~3
            yield name, ntype, desc


def pvh_entry(elf):
    for name, ntype, desc in iter_notes(elf):
        if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(desc) >= 8:
                return struct.unpack_from("<Q", desc)[0]
            if len(desc) >= 4:
                return u32(desc, 0)
    return None


def main(argv):
    if len(argv) == 3 and argv[1] == "--probe":
        image = open(argv[2], "rb").read()
        fmt, _payload, _start = locate_payload(image)
        print(fmt[0])
        return 0
    if len(argv) != 3 or argv[1].startswith("-"):
        sys.stderr.write(__doc__)
        return 2
    src, dst = argv[1], argv[2]
    image = open(src, "rb").read()
    version, _pm, _off, _len = read_setup_header(image)
    fmt, payload, start = locate_payload(image)
    if payload is not None:
        elf = decompress(fmt, payload)
    else:
        # Scanned start: feed everything from the magic on; the tool may complain about
        # the trailing data, which is accepted when it still produced an ELF file.
        elf = decompress(fmt, image[start:], exact=False)
    check_elf(elf)
    entry = pvh_entry(elf)
    directory = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=".vmlinux.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(elf)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print("boot_protocol=%x.%02x" % (version >> 8, version & 0xFF))
    print("compression=%s" % fmt[0])
    print("payload_start=0x%x" % start)
    print("vmlinux_size=%d" % len(elf))
    print("pvh_entry=%s" % ("0x%x" % entry if entry is not None else "none"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except MissingTool as e:
        sys.stderr.write("missing-tool: %s\n" % e.args[0])
        sys.exit(3)
    except (Failure, OSError) as e:
        sys.stderr.write("extract-vmlinux: %s\n" % e)
        sys.exit(1)
