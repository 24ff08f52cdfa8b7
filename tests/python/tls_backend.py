#!/usr/bin/env python3
"""TLS backend for the ntlm-splice SNI routing tests: an HTTPS server that names itself.

Listens on 127.0.0.1 (port 0: the kernel picks one), prints `port=N` on stdout once it
accepts connections, and answers every HTTP request on a TLS connection with one line:

    backend=NAME sni=SERVER_NAME

NAME is --name; SERVER_NAME is the server name the client's ClientHello carried as this
server saw it (`-` for none), so a test sees both which backend it reached and that the
ClientHello arrived intact through the proxy.

`GET /count` answers `accepted=N` instead: the TCP connections this server has accepted so
far, this one included. Connections are accepted one after another by one thread, so a
/count request made after some event counts every connection made before it. A test uses it
to check that the proxy opened no backend connection.

The TLS handshake runs in each connection's own thread, never in the accepting one, so a
client that stalls its handshake holds up nobody else.

Exit codes: 0 on SIGTERM/SIGINT, 2 usage error (argparse), 3 certificate or key unusable.
"""

import argparse
import signal
import socket
import socketserver
import ssl
import sys
import threading

# Seconds a connection may stay silent (in its handshake or request) before it is dropped.
IO_TIMEOUT_SECS = 20
# The most bytes of request head read before answering; the tests send a few hundred.
MAX_REQUEST_HEAD = 64 * 1024


class Server(socketserver.ThreadingTCPServer):
    """Counts accepted connections; the TLS handshake is left to the handler threads."""

    daemon_threads = True
    allow_reuse_address = True
    # Deep accept queue: a burst of clients never overflows it.
    request_queue_size = 1024

    def __init__(self, context: ssl.SSLContext, name: str):
        super().__init__(("127.0.0.1", 0), Handler)
        self.context = context
        self.name = name
        self.accepted = 0
        self.lock = threading.Lock()

    def verify_request(self, request, client_address):
        # Runs in the accepting thread, once per accepted connection, in accept order.
        with self.lock:
            self.accepted += 1
        return True


class Handler(socketserver.BaseRequestHandler):
    """One TLS connection: handshake, one request, one answer, close."""

    def handle(self):
        server: Server = self.server
        self.request.settimeout(IO_TIMEOUT_SECS)
        tls = server.context.wrap_socket(self.request, server_side=True, do_handshake_on_connect=False)
        try:
            self.serve(server, tls)
        except (ssl.SSLError, OSError):
            # A failed handshake (a client that rejected the certificate) or a peer that
            # went away: the client reports it, this backend has nothing to add.
            pass
        finally:
            tls.close()

    @staticmethod
    def serve(server: Server, tls: ssl.SSLSocket):
        tls.do_handshake()
        head = b""
        while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
            chunk = tls.recv(4096)
            if not chunk:
                break
            head += chunk
        first = head.split(b"\r\n", 1)[0].split(b" ")
        path = first[1].decode("latin-1") if len(first) > 1 else "/"
        if path == "/count":
            with server.lock:
                body = f"accepted={server.accepted}\n"
        else:
            body = f"backend={server.name} sni={getattr(tls, 'seen_sni', None) or '-'}\n"
        data = body.encode()
        tls.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        # close_notify, then wait for the client's: the connection ends cleanly both ways.
        tls.unwrap()

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cert", required=True, help="PEM certificate (chain) of this server")
    parser.add_argument("--key", required=True, help="PEM private key of --cert")
    parser.add_argument("--name", required=True, help="the name this backend answers with")
    args = parser.parse_args()

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.cert, args.key)
    except (ssl.SSLError, OSError) as exc:
        print(f"cannot load {args.cert} / {args.key}: {exc}", file=sys.stderr)
        return 3

    def on_sni(tls, server_name, _context):
        # Runs inside do_handshake, on the connection's own SSLSocket: remember the name there.
        tls.seen_sni = server_name
        return None

    context.sni_callback = on_sni
    server = Server(context, args.name)

    def stop(_signum, _frame):
        # shutdown() waits for serve_forever to return: run it off the main thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"port={server.server_address[1]}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
