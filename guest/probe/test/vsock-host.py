#!/usr/bin/env python3
"""Host side of the probe's vsock switches, for a VMM whose vsock device
speaks the hybrid (Unix socket) protocol: the VMM listens on SOCKET; a host
program connects, writes "CONNECT <port>\\n" and reads "OK <port>\\n"; a
guest connecting to host port P reaches SOCKET_P.

  vsock-host.py echo SOCKET PORT BYTES [TIMEOUT]
      probe.vsock_listen=PORT: connect to the guest (retried until it
      listens), send BYTES bytes, read them back, close; prints
      "echo ok <n>" or "echo bad <what>".
  vsock-host.py serve SOCKET PORT REPLY [TIMEOUT]
      probe.vsock_connect=PORT: listen on SOCKET_PORT, accept one
      connection, read a line, answer REPLY and a newline, wait for the
      guest to close; prints "served <line>"."""
import os
import socket
import sys
import threading
import time


def echo(path, port, nbytes, end):
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(max(0.1, end - time.monotonic()))
        try:
            s.connect(path)
            s.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                b = s.recv(1)
                if not b:
                    break
                line += b
            if line.startswith(b"OK "):
                break
        except OSError:
            pass
        s.close()
        if time.monotonic() > end:
            print("echo bad no connection")
            return 1
        time.sleep(0.01)
    data = bytes((i * 7 + 3) & 0xFF for i in range(nbytes))
    # Send while reading: the echo's flow control holds both directions.
    sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    sender.start()
    got = b""
    while len(got) < nbytes:
        b = s.recv(65536)
        if not b:
            break
        got += b
    sender.join(1)
    s.close()
    if got != data:
        print(f"echo bad got {len(got)} bytes, first difference at "
              f"{next((i for i, (a, b) in enumerate(zip(got, data)) if a != b), len(got))}")
        return 1
    print(f"echo ok {nbytes}")
    return 0


def serve(path, port, reply, end):
    p = f"{path}_{port}"
    if os.path.exists(p):
        os.unlink(p)
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(p)
    ls.listen(1)
    ls.settimeout(max(0.1, end - time.monotonic()))
    try:
        s, _ = ls.accept()
        s.settimeout(max(0.1, end - time.monotonic()))
        line = b""
        while not line.endswith(b"\n"):
            b = s.recv(1)
            if not b:
                break
            line += b
        s.sendall(reply.encode() + b"\n")
        while s.recv(4096):     # until the guest shuts down
            pass
        print(f"served {line.decode(errors='replace').rstrip()}")
        return 0
    except OSError as e:
        print(f"serve bad {e}")
        return 1
    finally:
        os.unlink(p)


def main():
    mode, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    end = time.monotonic() + (float(sys.argv[5]) if len(sys.argv) > 5 else 20)
    if mode == "echo":
        return echo(path, port, int(sys.argv[4]), end)
    return serve(path, port, sys.argv[4], end)


sys.exit(main())
