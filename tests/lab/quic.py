#!/usr/bin/env python3
"""A real QUIC server and client (aioquic), for the lab.

serve IP PORT CERT KEY: accept QUIC connections (ALPN hq-interop, h3) forever.
connect IP PORT SERVER_NAME: complete a handshake with that SNI, close, print "ok".
"""
import asyncio
import ssl
import sys

from aioquic.asyncio import connect, serve
from aioquic.quic.configuration import QuicConfiguration

ALPN = ["hq-interop", "h3"]


async def run_server(ip, port, cert, key):
    configuration = QuicConfiguration(is_client=False, alpn_protocols=ALPN)
    configuration.load_cert_chain(cert, key)
    await serve(ip, port, configuration=configuration)
    await asyncio.Future()


async def run_client(ip, port, server_name, limit):
    configuration = QuicConfiguration(is_client=True, alpn_protocols=ALPN, server_name=server_name)
    configuration.verify_mode = ssl.CERT_NONE
    async with connect(ip, port, configuration=configuration) as client:
        await asyncio.wait_for(client.ping(), timeout=limit / 3)
    print("ok", flush=True)


if __name__ == "__main__":
    mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        asyncio.run(run_server(ip, port, sys.argv[4], sys.argv[5]))
    else:
        # The client's time limit in seconds (the lab scales it on slow machines).
        limit = float(sys.argv[5]) if len(sys.argv) > 5 else 15.0
        asyncio.run(asyncio.wait_for(run_client(ip, port, sys.argv[4], limit), timeout=limit))
