#!/usr/bin/env python3
"""Checks the records the probe wrote with probe.blk_records=N (format in
../README.md). Usage: check-records.py IMAGE N [FIRST]

Checks records FIRST..N-1 (FIRST defaults to 0; a run with discard and
write-zeroes clears sectors 0..7 and 8, so check it with FIRST=9, or run the
probe with probe.blk_nodiscard). Prints "records N ok" and exits 0, or
prints the first bad index and what is wrong with it and exits 1."""
import struct
import sys

MAGIC = b"KEELREC1"


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def record(i):
    payload = bytes((i * 31 + j * 7) & 0xFF for j in range(488))
    body = MAGIC + struct.pack("<Q", i) + payload
    return body + struct.pack("<Q", fnv1a64(body))


def problem(sector, i):
    if len(sector) < 512:
        return "beyond the end of the image"
    if sector[:8] != MAGIC:
        return "magic %r" % sector[:8]
    if struct.unpack_from("<Q", sector, 8)[0] != i:
        return "index %d" % struct.unpack_from("<Q", sector, 8)[0]
    if struct.unpack_from("<Q", sector, 504)[0] != fnv1a64(sector[:504]):
        return "hash"
    if sector != record(i):
        return "payload"
    return None


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__.split("\n\n")[0])
    n = int(sys.argv[2])
    first = int(sys.argv[3]) if len(sys.argv) == 4 else 0
    with open(sys.argv[1], "rb") as f:
        f.seek(512 * first)
        data = f.read(512 * (n - first)) if n > first else b""
    for i in range(first, n):
        why = problem(data[512 * (i - first):512 * (i - first + 1)], i)
        if why:
            print("record %d bad: %s" % (i, why))
            sys.exit(1)
    print("records %d ok" % n)


if __name__ == "__main__":
    main()
