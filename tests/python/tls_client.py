#!/usr/bin/env python3
"""TLS client for the ntlm-splice PROXY protocol tests: one round trip from a chosen address.

Binds --bind (an IP, a free port), connects to --connect HOST:PORT, prints `local=IP:PORT`
(its own address, so the test can find the connection in every log) and flushes, then does
a TLS handshake with the server name --servername, verifying the certificate against
--cafile for that name, sends --send plus a newline, reads until that many bytes came back,
prints `echo=TEXT`, and closes.

Exit codes: 0 the echo matched, 1 it did not, 2 usage error (argparse), 4 a socket or TLS
error (printed on stderr).
"""

import argparse
import socket
import ssl
import sys

# Seconds any one step may take: on loopback every step is quick.
STEP_TIMEOUT = 10


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bind", required=True, help="source IP address")
    p.add_argument("--connect", required=True, help="HOST:PORT ([::1]:PORT for IPv6)")
    p.add_argument("--servername", required=True, help="the TLS server name (SNI) to send and verify")
    p.add_argument("--cafile", required=True, help="PEM file of the certificate(s) to trust")
    p.add_argument("--send", required=True, help="text to send (a newline is appended)")
    a = p.parse_args()
    host, _, port = a.connect.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        raw = socket.socket(family, socket.SOCK_STREAM)
        raw.settimeout(STEP_TIMEOUT)
        raw.bind((a.bind, 0))
        raw.connect((host, int(port)))
        local = raw.getsockname()
        shown = f"[{local[0]}]:{local[1]}" if family == socket.AF_INET6 else f"{local[0]}:{local[1]}"
        print(f"local={shown}", flush=True)
        ctx = ssl.create_default_context(cafile=a.cafile)
        with ctx.wrap_socket(raw, server_hostname=a.servername) as tls:
            msg = (a.send + "\n").encode()
            tls.sendall(msg)
            got = b""
            while len(got) < len(msg):
                chunk = tls.recv(len(msg) - len(got))
                if not chunk:
                    break
                got += chunk
    except (OSError, ssl.SSLError) as exc:
        print(f"tls_client: {exc}", file=sys.stderr)
        return 4
    print(f"echo={got.decode(errors='replace').rstrip()}", flush=True)
    return 0 if got == msg else 1


if __name__ == "__main__":
    sys.exit(main())
