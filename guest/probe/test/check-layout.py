#!/usr/bin/env python3
"""Checks that probe.garbage's memory (garbage.o's `dma`) is the last thing in
the image: devices may write past its buffer into free RAM, never into another
driver's memory. Usage: check-layout.py OUTDIR"""
import subprocess, sys

out = sys.argv[1]
def syms(path):
    rows = subprocess.run(["nm", "-S", "-n", path], capture_output=True, text=True,
                          check=True).stdout.split("\n")
    return [r.split() for r in rows if r.strip()]

own = [r for r in syms(f"{out}/garbage.o") if r[-1] == "dma"]
image = syms(f"{out}/probe.elf")
end = int(next(r[0] for r in image if r[-1] == "_end"), 16)
last = [r for r in image if r[-1] == "dma"][-1]
if len(own) != 1 or last[1] != own[0][1] or int(last[0], 16) + int(last[1], 16) != end:
    print(f"garbage memory is not last: last dma {last}, garbage.o {own}, _end {end:#x}")
    sys.exit(1)
print(f"garbage memory last, up to _end {end:#x}")
