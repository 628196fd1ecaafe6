"""The apiserver on the machine's loopback, as kind publishes it: a TCP forwarder that accepts on a
socket of the machine (handed over by `up`, already listening on 127.0.0.1) and connects each client to
the apiserver from inside the control-plane node's network namespace. Nothing of the machine's network
changes; the forwarder is a process like any client.

    python -m tests.k8s.forward FD NETNS_PATH HOST PORT
"""

from __future__ import annotations

import socket
import sys
import threading

from tests.kubeapi import in_netns


def pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:  # either side's end ends both directions (the other thread's recv returns)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def serve(listener: socket.socket, netns: str, host: str, port: int) -> None:
    while True:
        client, _ = listener.accept()
        try:
            upstream = in_netns(netns, lambda: socket.create_connection((host, port), timeout=10))
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def main(argv: list[str]) -> None:
    fd, netns, host, port = argv
    serve(socket.socket(fileno=int(fd)), netns, host, int(port))


if __name__ == "__main__":
    main(sys.argv[1:])
