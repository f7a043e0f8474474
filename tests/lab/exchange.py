#!/usr/bin/env python3
"""A TCP exchange with byte counts the test knows.

serve IP PORT: for each connection, read the 8-byte header (bytes up, bytes
down), then that many bytes, then send the bytes down and close.
connect IP PORT UP DOWN [PAUSE]: send UP bytes, wait PAUSE seconds, read
DOWN bytes, close; print the client's source port.
"""
import socket
import struct
import sys
import time


def read_exactly(conn, n):
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(65536, n - len(data)))
        if not chunk:
            raise ConnectionError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def serve(ip, port):
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((ip, port))
    listener.listen(128)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                up, down = struct.unpack("!II", read_exactly(conn, 8))
                read_exactly(conn, up)
                conn.sendall(b"d" * down)
            except (ConnectionError, OSError) as error:
                print(f"exchange: {error}", file=sys.stderr, flush=True)


def connect(ip, port, up, down, pause=0.0):
    with socket.create_connection((ip, port), timeout=30) as conn:
        print(conn.getsockname()[1], flush=True)
        # The 8-byte header counts towards the bytes sent up.
        conn.sendall(struct.pack("!II", up - 8, down) + b"u" * (up - 8))
        time.sleep(pause)
        read_exactly(conn, down)


if __name__ == "__main__":
    mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        serve(ip, port)
    else:
        connect(ip, port, int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
