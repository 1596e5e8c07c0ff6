#!/usr/bin/env python3
"""Memory under a connection burst: mesh-proxy's RSS idle, at the peak of N client
connections each with one request answered (kept open), and 10 s after they close.

    bench/burst.py PROXY_BINARY [CONNECTIONS]      (default 5,000)

Loopback only: the shared harness's backend, the proxy in front of it, asyncio clients.
Prints one JSON line.
"""
import asyncio, json, os, re, resource, socket, subprocess, sys

HERE = os.path.dirname(os.path.abspath(__file__))
BACKEND = os.path.join(HERE, "..", "..", "shared", "bench", "backend", "target", "release", "backend")

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

async def client(port, failures):
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: burst\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        await reader.readexactly(length)
        return writer
    except Exception:
        failures.append(1)
        return None

async def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    up_port = free_port()
    backend = subprocess.Popen([BACKEND, f"127.0.0.1:{up_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--admin", "off", "--upstream", f"127.0.0.1:{up_port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "MESH_PROXY_LOG": "error"})
    try:
        line = await asyncio.get_event_loop().run_in_executor(None, proc.stdout.readline)
        port = int(re.search(rb"listening on http://127\.0\.0\.1:(\d+)", line).group(1))
        await asyncio.sleep(1)
        idle = rss_kib(proc.pid)
        writers, failures = [], []
        for i in range(0, n, 100):
            writers += await asyncio.gather(*(client(port, failures) for _ in range(min(100, n - i))))
        await asyncio.sleep(1)
        peak = rss_kib(proc.pid)
        for w in writers:
            if w:
                w.close()
        await asyncio.sleep(10)
        after = rss_kib(proc.pid)
        print(json.dumps({"binary": os.path.basename(binary), "connections": n, "failed": len(failures),
                          "idle_kib": idle, "peak_kib": peak, "after_10s_kib": after,
                          "after_over_idle": round(after / idle, 2)}))
    finally:
        proc.terminate()
        backend.terminate()

asyncio.run(main())
