"""Forward every TCP connection from LISTEN_HOST:PORT to TARGET_HOST:PORT, bytes as they
are (TLS passes through). The local cluster's API server listens on 127.0.0.1 only,
which pods cannot reach; with the real node this forwards the node IP to it, so the
`kubernetes` Service (10.96.0.1:443, via kube-proxy) leads pods to the API server.

Usage: python3 tcpforward.py LISTEN_HOST:PORT TARGET_HOST:PORT   (stdlib only)
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    # Pass the end of one direction on as a half-close: a client that shuts down its
    # sending side still waits for the answer (closing here would drop it).
    if writer.can_write_eof():
        writer.write_eof()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
    try:
        target_reader, target_writer = await asyncio.open_connection(host, port)
    except OSError:
        writer.close()
        return
    await asyncio.gather(_pipe(reader, target_writer), _pipe(target_reader, writer), return_exceptions=True)
    for w in (writer, target_writer):
        w.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def _serve(listen: str, target: str) -> None:
    host, port = _split(target)
    listen_host, listen_port = _split(listen)
    server = await asyncio.start_server(lambda r, w: _handle(r, w, host, port), listen_host, listen_port)
    print(f"tcpforward: {listen} -> {target}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
