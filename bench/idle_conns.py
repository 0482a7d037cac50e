#!/usr/bin/env python3
"""Open N keep-alive client connections to a proxy on loopback, send one
GET /ping on each and read its answer, then keep them all open and idle.

Prints `READY open=N failed=M` once every connection has had its answer, then
waits (bounded by --hold) until stdin closes or the hold time runs out (with
--no-stdin: for --hold seconds), and
prints `STILL_OPEN n=K` (connections the server had not closed) before exiting.
bench.py reads the proxy's RSS while this sits idle.
"""
import argparse
import asyncio
import resource
import sys
import time


async def one(host, port, sem, conns, failures):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            writer.write(b"GET /ping HTTP/1.1\r\nHost: bench\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await asyncio.wait_for(reader.readexactly(length), 10)
            if not head.startswith(b"HTTP/1.1 200"):
                failures.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            conns.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - counted and reported
            failures.append(type(e).__name__ + ": " + str(e))


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=200,
                    help="connections being set up at once (bounds the upstream pool the proxy needs)")
    ap.add_argument("--hold", type=float, default=60.0, help="seconds to keep them open at most")
    ap.add_argument("--no-stdin", action="store_true", help="hold for --hold seconds; do not watch stdin")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))

    conns, failures = [], []
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    await asyncio.gather(*(one(args.host, args.port, sem, conns, failures) for _ in range(args.n)))
    print(f"READY open={len(conns)} failed={len(failures)} setup_s={time.monotonic() - t0:.1f}", flush=True)
    if failures:
        print("FIRST_FAILURE " + failures[0], flush=True)

    if args.no_stdin:
        await asyncio.sleep(args.hold)
    else:
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        try:
            await asyncio.wait_for(stdin_closed, args.hold)
        except asyncio.TimeoutError:
            pass
    still = sum(1 for r, _ in conns if not r.at_eof())
    print(f"STILL_OPEN n={still}", flush=True)
    for _, w in conns:
        w.close()
    # Exit without waiting on executor thread blocked on stdin.
    sys.stdout.flush()
    import os
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
