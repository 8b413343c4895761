#!/usr/bin/env python3
"""Host side of probe.net_echo: waits for tap TAP to appear (the VMM creates
it), brings it up, and echoes every EtherType 0x88b5 frame whose payload
starts with KEEL-PROBE back to its sender with KEEL-ECHO instead. Run it
inside the network namespace the VMM runs in. Exits after echoing COUNT
distinct payloads, or after TIMEOUT seconds, or when the tap goes away;
prints "echoed <frames>".

usage: net-echo.py TAP [COUNT] [TIMEOUT]"""
import os
import socket
import subprocess
import sys
import time

ETH_TYPE = 0x88B5
HOST_MAC = bytes.fromhex("020000000002")


def main():
    tap = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 30
    end = time.monotonic() + (float(sys.argv[3]) if len(sys.argv) > 3 else 30)
    while not os.path.exists(f"/sys/class/net/{tap}"):
        if time.monotonic() > end:
            print("no tap")
            return 1
        time.sleep(0.005)
    subprocess.run(["ip", "link", "set", tap, "up"], check=True)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_TYPE))
    s.bind((tap, ETH_TYPE))
    n, seen = 0, set()
    while len(seen) < count:
        left = end - time.monotonic()
        if left <= 0:
            break
        s.settimeout(left)
        try:
            f = s.recv(65536)
        except (socket.timeout, OSError):  # OSError: the VMM closed the tap
            break
        if len(f) < 14 + 10 or f[12:14] != b"\x88\xb5" or f[14:24] != b"KEEL-PROBE":
            continue
        echo = f[6:12] + HOST_MAC + f[12:14] + b"KEEL-ECHO" + f[24:]
        s.send(echo.ljust(60, b"\0"))
        n += 1
        seen.add(f[24:])
    print(f"echoed {n}")
    return 0


sys.exit(main())
