#!/usr/bin/env python3
"""NTLM client for the ntlm-splice end-to-end tests, built on requests-ntlm (pyspnego).

Opens one requests.Session, logs in with NTLM and sends COUNT GET requests to URL,
printing one line per request:

    status=200 handshake=1 body=EXAMPLE\\alice

`handshake=1` means the request was answered only after an NTLM handshake (a 401
first); later requests on the same kept-alive connection should show `handshake=0`,
because NTLM authenticates the connection, not the request.

Exit codes: 0 all requests done (whatever their status), 2 usage error,
3 requests-ntlm missing, 4 HTTP/transport error.
"""

import argparse
import sys

try:
    import requests
    from requests_ntlm import HttpNtlmAuth
except ImportError as exc:  # pragma: no cover - depends on the machine
    print(
        f"requests_ntlm is not importable ({exc}): pip install requests-ntlm",
        file=sys.stderr,
    )
    sys.exit(3)

# Seconds to wait for a connection or a response before giving up.
TIMEOUT_SECS = 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("user", help="DOMAIN\\user or user")
    parser.add_argument("password")
    parser.add_argument("--count", type=int, default=1, help="requests to send")
    args = parser.parse_args()

    with requests.Session() as session:
        session.trust_env = False  # never go through an http_proxy from the environment
        session.auth = HttpNtlmAuth(args.user, args.password)
        for _ in range(args.count):
            try:
                response = session.get(args.url, timeout=TIMEOUT_SECS)
            except requests.RequestException as exc:
                print(f"request failed: {exc}", file=sys.stderr)
                return 4
            handshake = 1 if response.history else 0
            body = response.text.rstrip("\n")
            print(f"status={response.status_code} handshake={handshake} body={body}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
