#!/usr/bin/env python3
"""canary-proxy against HAProxy, NGINX, Traefik and Caddy: same split, same
upstreams, same load, same machine, one run. Rows: the headline (one thread),
the same against static NGINX upstreams, two threads, TLS, HTTP/2, idle
connections. Called by `bench/run` (which installs the tools and builds the
binaries); the peers' configs are in bench/peers/; see docs/performance.md
for the method.

Only loopback traffic; every load is bounded in time; every process started
here is stopped on exit (also on Ctrl-C, SIGTERM and errors).
"""
import argparse
import atexit
import datetime
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LUA = os.path.join(HERE, "count.lua")
IDLE = os.path.join(HERE, "idle_conns.py")
# Config templates of the peers (Traefik, Caddy) and of the static upstream.
PEERS = os.path.join(HERE, "peers")

# The pinning every system gets: upstreams and the system under test on core
# 0, the load generator alone on core 1 (the issue's reference setup).
SUT_CPUS_1 = "0"
SUT_CPUS_2 = "0,1"  # second figure: two worker threads, both cores
UPSTREAM_CPUS = "0"
LOAD_CPUS = "1"
CONNECTIONS = 64
WRK_THREADS = 2
STABLE_SHARE = 0.9
# The gRPC-shaped row: h2load's connections, and concurrent streams on each.
H2_CONNECTIONS = 64
H2_STREAMS = 10


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# processes


class Procs:
    """Every process this run started, so all of them are stopped at exit."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.live = []

    def start(self, name, argv, cpus, env=None, stdin=None):
        full_env = dict(os.environ)
        full_env.update(env or {})
        out = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        cmd = ["taskset", "-c", cpus] + argv if cpus else argv
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=stdin or subprocess.DEVNULL,
                             env=full_env, start_new_session=True)
        p.bench_name = name
        self.live.append(p)
        return p

    def stop(self, p, grace=3.0):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: our process and its children only
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        # nginx/haproxy workers may outlive a master that already exited.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            self.stop(p)

    def log_tail(self, name, n=20):
        try:
            with open(os.path.join(self.workdir, f"{name}.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return "(no log)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read()


def poll_until(check, what, procs, p, deadline_s=30.0, interval=0.05):
    """Poll `check()` (None when satisfied, else what it saw) until it is
    satisfied or `deadline_s` passes (no fixed sleeps); fail early if the
    process `p` exits."""
    end = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < end:
        if p is not None and p.poll() is not None:
            raise RuntimeError(f"{p.bench_name} exited with {p.returncode}:\n{procs.log_tail(p.bench_name)}")
        try:
            last = check()
            if last is None:
                return
        except Exception as e:  # noqa: BLE001
            last = e
        time.sleep(interval)
    name = p.bench_name if p is not None else "the server"
    raise RuntimeError(f"{name} {what} after {deadline_s}s: {last}\n"
                       + (procs.log_tail(p.bench_name) if p is not None else ""))


def wait_ready(url, procs, p, deadline_s=30.0):
    """Poll until `url` answers 200."""
    def check():
        status, _, _ = http_get(url, 1.0)
        return None if status == 200 else f"status {status}"
    poll_until(check, f"not ready at {url}", procs, p, deadline_s)


def h2c_get(url, timeout=5.0):
    """(status, x-ping-version, body) of one GET over h2c with prior
    knowledge (nghttp, from the same Debian package as h2load)."""
    out = subprocess.run(["nghttp", "-v", "-t", str(math.ceil(timeout)), url], capture_output=True, text=True,
                         timeout=timeout + 5)
    status = re.search(r"recv \(stream_id=\d+\) :status: (\d+)", out.stdout)
    version = re.search(r"recv \(stream_id=\d+\) x-ping-version: (\S+)", out.stdout)
    # nghttp writes the body as it arrives, between its frame log lines.
    body = "pong" if re.search(r"(^|\n)pong(\[|\n|$)", out.stdout) else ""
    if out.returncode != 0 or not status:
        raise RuntimeError(f"nghttp {url} failed (exit {out.returncode}): {(out.stdout + out.stderr)[-600:]}")
    return int(status.group(1)), version.group(1) if version else None, body


def wait_pong_h2c(url, procs, p, deadline_s=30.0):
    """Poll until `url` answers 200 `pong` with an x-ping-version over h2c."""
    def check():
        status, version, body = h2c_get(url, 2.0)
        if status == 200 and version and body == "pong":
            return None
        return f"status {status}, x-ping-version {version}, body {body!r}"
    poll_until(check, f"does not answer pong over h2c at {url}", procs, p, deadline_s, interval=0.1)


def socket_inodes(pids):
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    return inodes


def established_to(ports, pids):
    """Established TCP connections that these processes hold to each of
    these loopback ports: a proxy's upstream connections (only its own, not
    the pools of the other systems running alongside)."""
    want = {p: 0 for p in ports}
    mine = socket_inodes(pids)
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "01" or fields[9] not in mine:  # 01: TCP_ESTABLISHED
                    continue
                port = int(fields[2].rsplit(":", 1)[1], 16)
                if port in want:
                    want[port] += 1
    except OSError:
        pass
    return want


CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_SETTLE = 2.0  # seconds between the last idle connection opening and reading RSS


def cpu_seconds(pids):
    """(user, system) CPU time of these processes (all their threads), in seconds."""
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return user / CLK_TCK, system / CLK_TCK


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def proc_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------
# systems under test


class System:
    """One system under test: how to start it and which PIDs serve traffic."""

    # The upstream pair this system proxies to (an Upstreams); None: the
    # bench's ping-backend pair. Set by Bench.http1_systems.
    upstreams = None
    # A command the system runs under (valgrind, in the instructions row).
    wrap = ()

    def __init__(self, key, label):
        self.key = key
        self.label = label
        self.proc = None
        self.url = None

    def upstream_addrs(self):
        """{"v1": host:port, "v2": host:port} of this system's upstreams."""
        return (self.upstreams or self.bench.ping).addr

    def serving_pids(self):
        """PIDs whose memory is the system's (workers, not a master)."""
        return [self.proc.pid] if self.proc else []

    def rss_kb(self, field="VmHWM"):
        vals = [proc_kb(pid, field) for pid in self.serving_pids()]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None


class CanaryProxy(System):
    def __init__(self, bench, threads, cpus, tls=None, binary=None, label="canary-proxy", routes=None):
        super().__init__(label, label)
        self.bench, self.threads, self.cpus, self.tls = bench, threads, cpus, tls
        self.binary = binary or bench.proxy_bin
        self.routes = routes or bench.routes_file

    def start(self, procs):
        b = self.bench
        port, admin = free_port(), free_port()
        argv = [self.binary, "run", "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                "--routes", self.routes, "--threads", str(self.threads),
                "--drain-delay", "0s", "--shutdown-timeout", "1s"]
        if self.tls:
            tls_port = free_port()
            argv += ["--tls-listen", f"127.0.0.1:{tls_port}", "--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        self.proc = procs.start(f"{self.key}-t{self.threads}{'-tls' if self.tls else ''}", [*self.wrap, *argv],
                                self.cpus,
                                env={"RUST_LOG": "warn"})
        self.admin = f"http://127.0.0.1:{admin}"
        wait_ready(f"http://127.0.0.1:{port}/ping", procs, self.proc)
        self.url = f"https://127.0.0.1:{tls_port}/ping" if self.tls else f"http://127.0.0.1:{port}/ping"
        self.plain_url = f"http://127.0.0.1:{port}/ping"

    def own_counts(self):
        """canary-proxy's own per-version request counters, from /metrics."""
        _, _, body = http_get(self.admin + "/metrics", 5)
        counts = {}
        for line in body.decode().splitlines():
            if line.startswith("canary_proxy_requests_total{"):
                m = re.search(r'version="([^"]+)"', line)
                if m:
                    counts[m.group(1)] = counts.get(m.group(1), 0) + int(float(line.rsplit(" ", 1)[1]))
        return counts

    def split_counts(self):
        """Answers per upstream so far (v1 stable, v2 canary), for loads
        whose client cannot read the x-ping-version header (h2load)."""
        own = self.own_counts()
        return {"v1": own.get("stable", 0), "v2": own.get("canary", 0)}

    def upstream_connections(self):
        """`canary_proxy_upstream_connections_opened_total` per upstream."""
        _, _, body = http_get(self.admin + "/metrics", 5)
        opened = {}
        for line in body.decode().splitlines():
            m = re.match(r'canary_proxy_upstream_connections_opened_total\{.*version="([^"]+)".*\} (\S+)', line)
            if m:
                opened[{"stable": "v1", "canary": "v2"}.get(m.group(1), m.group(1))] = int(float(m.group(2)))
        return opened


def haproxy_maxconn():
    """HAProxy reserves two descriptors per connection and refuses to start
    when RLIMIT_NOFILE cannot cover maxconn; a container may cap the hard
    limit (20000 on the machine this was written on), so fit it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 30000
    return min(30000, (hard - 100) // 2)


# The defaults section of every HAProxy configuration here: keep-alive both
# ways, reused upstream connections, and the same headers canary-proxy adds.
HAPROXY_DEFAULTS = """defaults
    mode http
    option http-keep-alive
    # the same headers canary-proxy adds
    option forwardfor
    http-reuse always
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
"""


class HAProxy(System):
    def __init__(self, bench, threads, cpus, tls_pem=None, h2=False):
        super().__init__("haproxy", "HAProxy")
        self.bench, self.threads, self.cpus, self.tls_pem, self.h2 = bench, threads, cpus, tls_pem, h2

    def start(self, procs):
        b = self.bench
        port = free_port()
        bind = f"127.0.0.1:{port}"
        if self.tls_pem:
            bind += f" ssl crt {self.tls_pem} alpn http/1.1"
        # h2: h2c (prior knowledge) on the front door and to the upstreams,
        # and the stats socket that counts answers per server.
        proto = " proto h2" if self.h2 else ""
        bind += proto
        name = f"haproxy-t{self.threads}{'-tls' if self.tls_pem else ''}{'-h2' if self.h2 else ''}"
        self.stats_sock = os.path.join(b.workdir, f"{name}.sock")
        stats = f"\n    stats socket {self.stats_sock} mode 600 level user" if self.h2 else ""
        cfg = os.path.join(b.workdir, f"{name}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    nbthread {self.threads}
    maxconn {haproxy_maxconn()}{stats}
{HAPROXY_DEFAULTS}frontend fe
    bind {bind}
    maxconn {haproxy_maxconn()}
    http-request set-header X-Forwarded-Proto {'https' if self.tls_pem else 'http'}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be
backend be
    balance roundrobin
    server stable {self.upstream_addrs()['v1']} weight {int(STABLE_SHARE * 100)} maxconn 30000{proto}
    server canary {self.upstream_addrs()['v2']} weight {int(round((1 - STABLE_SHARE) * 100))} maxconn 30000{proto}
""")
        self.proc = procs.start(name, [*self.wrap, "haproxy", "-db", "-f", cfg], self.cpus)
        scheme = "https" if self.tls_pem else "http"
        self.url = f"{scheme}://127.0.0.1:{port}/ping"
        if self.tls_pem:
            import ssl
            ctx = ssl._create_unverified_context()  # our own self-signed cert, loopback only
            end = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(self.url, timeout=1, context=ctx) as r:
                        if r.status == 200:
                            break
                except Exception:  # noqa: BLE001
                    if time.monotonic() > end or self.proc.poll() is not None:
                        raise RuntimeError("HAProxy (TLS) not ready:\n" + procs.log_tail(self.proc.bench_name))
                    time.sleep(0.05)
        elif self.h2:
            wait_pong_h2c(self.url, procs, self.proc)
        else:
            wait_ready(self.url, procs, self.proc)

    def server_stats(self):
        """The `show stat` row of each server of backend `be`, by name."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(self.stats_sock)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "be" and row.get("svname") in ("stable", "canary"):
                rows[row["svname"]] = row
        return rows

    def split_counts(self):
        rows = self.server_stats()
        return {"v1": int(rows["stable"]["stot"] or 0), "v2": int(rows["canary"]["stot"] or 0)}

    def upstream_connections(self):
        """Connections HAProxy opened to each server (its `connect` counter)."""
        rows = self.server_stats()
        return {"v1": int(rows["stable"]["connect"] or 0), "v2": int(rows["canary"]["connect"] or 0)}


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


def nginx_main(workers, prefix):
    """The top of every proxying NGINX configuration here, up to and
    including the opening of the `http` block."""
    return f"""daemon off;
user root;
worker_processes {workers};
worker_rlimit_nofile 40000;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 30000; }}
http {{
"""


def nginx_http_common(prefix):
    """Client keep-alive as long as any load runs, and every temporary
    path inside the run's own directory (never NGINX's system paths)."""
    return f"""    keepalive_timeout 60s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


class Nginx(System):
    def __init__(self, bench, workers, cpus, h2=False):
        super().__init__("nginx", "NGINX")
        self.bench, self.workers, self.cpus, self.h2 = bench, workers, cpus, h2

    def start(self, procs):
        b = self.bench
        port = free_port()
        name = f"nginx-w{self.workers}{'-h2' if self.h2 else ''}"
        prefix = os.path.join(b.workdir, name)
        os.makedirs(prefix, exist_ok=True)
        cfg = os.path.join(prefix, "nginx.conf")
        if self.h2:
            # h2c on the front door, and `grpc_pass` to the upstreams: NGINX's
            # only proxy module that speaks HTTP/2 (h2c for grpc://) upstream.
            # It passes a plain GET as well, and opens one upstream connection
            # per request in flight (no multiplexing), kept in the pool.
            # `listen ... http2` before 1.25.1, the `http2` directive since.
            listen = (f"listen 127.0.0.1:{port} reuseport;\n        http2 on;" if nginx_version() >= (1, 25, 1)
                      else f"listen 127.0.0.1:{port} http2 reuseport;")
            self.access_log = os.path.join(prefix, "upstreams.log")
            self.log_offset, self.log_counts = 0, {"v1": 0, "v2": 0}
            logging = f"""# Open source NGINX has no per-upstream counter: the split is counted
    # from a buffered log of the upstream each answer came from.
    log_format upstream "$upstream_addr";
    access_log {self.access_log} upstream buffer=64k flush=1s;"""
            # more than h2load's 640 streams in flight, so the pool does not churn
            keepalive = 1024
            location = """grpc_pass grpc://versions;
            # the same headers canary-proxy adds
            grpc_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            grpc_set_header X-Forwarded-Proto $scheme;
            grpc_set_header X-Forwarded-Host $http_host;"""
        else:
            listen = f"listen 127.0.0.1:{port} reuseport;"
            logging = "access_log off;"
            keepalive = 256
            location = """proxy_pass http://versions;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # the same headers canary-proxy adds, and the client's Host
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;"""
        with open(cfg, "w") as f:
            f.write(f"""{nginx_main(self.workers, prefix)}    {logging}
{nginx_http_common(prefix)}    upstream versions {{
        server {self.upstream_addrs()['v1']} weight={int(STABLE_SHARE * 100)};
        server {self.upstream_addrs()['v2']} weight={int(round((1 - STABLE_SHARE) * 100))};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}
    server {{
        {listen}
        location / {{
            {location}
        }}
    }}
}}
""")
        self.proc = procs.start(name, ["nginx", "-p", prefix, "-c", cfg, "-e", "stderr"], self.cpus)
        self.url = f"http://127.0.0.1:{port}/ping"
        if self.h2:
            wait_pong_h2c(self.url, procs, self.proc)
        else:
            wait_ready(self.url, procs, self.proc)

    def split_counts(self):
        """Answers per upstream so far, from the access log (read on from
        where the last call stopped; NGINX flushes its buffer within 1s)."""
        version_of = {addr: v for v, addr in self.upstream_addrs().items()}
        with open(self.access_log, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        complete = data.rfind(b"\n") + 1
        self.log_offset += complete
        for line in data[:complete].decode().splitlines():
            # "addr" or, after a retry, "addr1, addr2": the last one answered.
            v = version_of.get(line.rsplit(", ", 1)[-1].strip())
            if v:
                self.log_counts[v] += 1
        return dict(self.log_counts)

    def serving_pids(self):
        return children(self.proc.pid) if self.proc else []


class Direct(System):
    """The ceiling: wrk straight to the stable upstream, no proxy."""

    def __init__(self, bench, h2=False, upstreams=None):
        super().__init__("direct", "direct (ceiling)")
        self.bench, self.h2, self.upstreams = bench, h2, upstreams

    def start(self, procs):
        self.url = f"http://{self.upstream_addrs()['v1']}/ping"
        if self.h2:
            wait_pong_h2c(self.url, procs, None)

    def serving_pids(self):
        # CPU per request here is the stable upstream's own cost (its RSS
        # is not reported: it is no proxy).
        return list((self.upstreams or self.bench.ping).pids["v1"])

    def rss_kb(self, field="VmHWM"):
        return None


# The HTTP/2 front-door row: clients speak h2 (h2c with prior knowledge on the
# plain port, h2 over TLS by ALPN on the TLS port); every proxy speaks
# HTTP/1.1 with keep-alive to the upstreams, as in the headline. (The
# gRPC-shaped row above is h2c end to end.) canary-proxy needs no class of its
# own: it serves h2c prior knowledge on its plain port and offers ALPN h2 on
# --tls-listen. `url` is the TLS URL and `plain_url` the h2c one, as
# CanaryProxy sets them when given a certificate.


class HAProxyH2Front(HAProxy):
    def __init__(self, bench, threads, cpus, pem):
        super().__init__(bench, threads, cpus)
        self.pem = pem

    def start(self, procs):
        b = self.bench
        port, tls_port = free_port(), free_port()
        name = f"haproxy-t{self.threads}-h2front"
        # the stats socket counts answers per server: h2load cannot read the header
        self.stats_sock = os.path.join(b.workdir, f"{name}.sock")
        cfg = os.path.join(b.workdir, f"{name}.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
    nbthread {self.threads}
    maxconn {haproxy_maxconn()}
    stats socket {self.stats_sock} mode 600 level user
{HAPROXY_DEFAULTS}frontend fe
    bind 127.0.0.1:{port} proto h2
    bind 127.0.0.1:{tls_port} ssl crt {self.pem} alpn h2,http/1.1
    maxconn {haproxy_maxconn()}
    http-request set-header X-Forwarded-Proto %[ssl_fc,iif(https,http)]
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    default_backend be
backend be
    balance roundrobin
    server stable {b.upstream_addr['v1']} weight {int(STABLE_SHARE * 100)} maxconn 30000
    server canary {b.upstream_addr['v2']} weight {int(round((1 - STABLE_SHARE) * 100))} maxconn 30000
""")
        self.proc = procs.start(name, ["haproxy", "-db", "-f", cfg], self.cpus)
        self.plain_url = f"http://127.0.0.1:{port}/ping"
        self.url = f"https://127.0.0.1:{tls_port}/ping"
        wait_pong_h2c(self.plain_url, procs, self.proc)
        wait_pong_h2c(self.url, procs, self.proc)


class NginxH2Front(Nginx):
    def __init__(self, bench, workers, cpus, cert, key):
        super().__init__(bench, workers, cpus)
        self.cert, self.key = cert, key

    def start(self, procs):
        b = self.bench
        port, tls_port = free_port(), free_port()
        name = f"nginx-w{self.workers}-h2front"
        prefix = os.path.join(b.workdir, name)
        os.makedirs(prefix, exist_ok=True)
        cfg = os.path.join(prefix, "nginx.conf")
        # `listen ... http2` before 1.25.1 (a plain `http2` listener takes h2c
        # with prior knowledge), the `http2` directive since.
        if nginx_version() >= (1, 25, 1):
            listen = (f"listen 127.0.0.1:{port} reuseport;\n        listen 127.0.0.1:{tls_port} ssl reuseport;"
                      f"\n        http2 on;")
        else:
            listen = f"listen 127.0.0.1:{port} http2 reuseport;\n        listen 127.0.0.1:{tls_port} ssl http2 reuseport;"
        self.access_log = os.path.join(prefix, "upstreams.log")
        self.log_offset, self.log_counts = 0, {"v1": 0, "v2": 0}
        with open(cfg, "w") as f:
            f.write(f"""{nginx_main(self.workers, prefix)}    # Open source NGINX has no per-upstream counter: the split is counted
    # from a buffered log of the upstream each answer came from.
    log_format upstream "$upstream_addr";
    access_log {self.access_log} upstream buffer=64k flush=1s;
{nginx_http_common(prefix)}    upstream versions {{
        server {b.upstream_addr['v1']} weight={int(STABLE_SHARE * 100)};
        server {b.upstream_addr['v2']} weight={int(round((1 - STABLE_SHARE) * 100))};
        # HTTP/1.1 upstream: one connection per request in flight, so more
        # than h2load's {H2_CONNECTIONS * H2_STREAMS} streams, or the pool churns
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        {listen}
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        location / {{
            proxy_pass http://versions;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
        }}
    }}
}}
""")
        self.proc = procs.start(name, ["nginx", "-p", prefix, "-c", cfg, "-e", "stderr"], self.cpus)
        self.plain_url = f"http://127.0.0.1:{port}/ping"
        self.url = f"https://127.0.0.1:{tls_port}/ping"
        wait_pong_h2c(self.plain_url, procs, self.proc)
        wait_pong_h2c(self.url, procs, self.proc)


# --------------------------------------------------------------------------
# the peers users pick for canaries (Traefik, Caddy) and the static upstream


def render(template, dest, **values):
    """Fill in a template of bench/peers/ (`$name` placeholders; a missing
    value is an error, not an empty string) and write it to `dest`."""
    with open(os.path.join(PEERS, template)) as f:
        text = string.Template(f.read()).substitute({k: str(v) for k, v in values.items()})
    with open(dest, "w") as f:
        f.write(text)
    return dest


def tool_bin(name):
    """A binary of the bench's venv (bench/requirements.txt: Traefik, Caddy),
    which bench/run exports as BENCH_VENV; else the venv running this script."""
    for venv in (os.environ.get("BENCH_VENV"), sys.prefix):
        if venv and os.access(os.path.join(venv, "bin", name), os.X_OK):
            return os.path.join(venv, "bin", name)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: bench/run installs it (bench/requirements.txt) into the venv it "
                           f"exports as BENCH_VENV")
    return found


def wait_pong(url, procs, p, deadline_s=30.0):
    """Poll until `url` answers 200 `pong` with an x-ping-version header:
    the system is up and routed to an upstream (Traefik, for one, answers 404
    until its file provider has loaded the routers). https is our own
    self-signed certificate, on loopback only."""
    import ssl
    ctx = ssl._create_unverified_context() if url.startswith("https:") else None

    def check():
        with urllib.request.urlopen(url, timeout=1.0, context=ctx) as r:
            body = r.read()
            version = r.headers.get("x-ping-version")
            if r.status == 200 and body == b"pong" and version:
                return None
            return f"status {r.status}, x-ping-version {version}, body {body[:40]!r}"
    poll_until(check, f"does not answer pong with an x-ping-version at {url}", procs, p, deadline_s)


class Upstreams:
    """One pair of upstreams, stable (v1) and canary (v2): their addresses,
    the PIDs that serve them (for the direct row's CPU) and the canary-proxy
    routes file that points at them."""

    def __init__(self, kind, addr, pids, routes_file):
        self.kind, self.addr, self.pids, self.routes_file = kind, addr, pids, routes_file


class GoPeer(System):
    """A peer written in Go (Traefik, Caddy): one process, its threads
    limited like the others' with GOMAXPROCS (the Go scheduler's threads
    running Go code) plus the same taskset pinning."""

    binary_name = None  # in the venv, and the process's comm

    def __init__(self, bench, key, label, threads, cpus, tls=None):
        super().__init__(key, label)
        self.bench, self.threads, self.cpus, self.tls = bench, threads, cpus, tls

    def start(self, procs):
        name = f"{self.key}-t{self.threads}{'-tls' if self.tls else ''}"
        self.dir = os.path.join(self.bench.workdir, name)
        os.makedirs(self.dir, exist_ok=True)
        self.port, self.tls_port = free_port(), free_port()
        argv = self.configure()
        # GOMAXPROCS as the thread count; HOME and XDG_* in the work
        # directory, so nothing is written outside it (Caddy keeps its
        # config and data directories there).
        env = {"GOMAXPROCS": str(self.threads), "HOME": self.dir,
               "XDG_CONFIG_HOME": os.path.join(self.dir, "config"), "XDG_DATA_HOME": os.path.join(self.dir, "data")}
        self.proc = procs.start(name, argv, self.cpus, env=env)
        self.url = (f"https://127.0.0.1:{self.tls_port}/ping" if self.tls else f"http://127.0.0.1:{self.port}/ping")
        wait_pong(self.url, procs, self.proc)
        if self.tls:
            wait_pong(f"http://127.0.0.1:{self.port}/ping", procs, self.proc)
        # taskset execs the binary, so the PID started is the one serving
        # (and the one whose CPU is read): check it, in case a wrapper ever
        # stands in between.
        with open(f"/proc/{self.proc.pid}/comm") as f:
            comm = f.read().strip()
        if comm != self.binary_name:
            raise RuntimeError(f"{self.label}: PID {self.proc.pid} is {comm!r}, not {self.binary_name!r}: the "
                               f"CPU and memory read would not be the proxy's")


class Traefik(GoPeer):
    """Traefik with the file provider: a `weighted` service of two services,
    one per version, and its Prometheus metrics with per-service labels (the
    functional peer of canary-proxy's per-version counters)."""

    binary_name = "traefik"

    def __init__(self, bench, threads, cpus, tls=None):
        super().__init__(bench, "traefik", "Traefik", threads, cpus, tls)

    def configure(self):
        ups = self.upstream_addrs()
        dynamic = os.path.join(self.dir, "dynamic")
        os.makedirs(dynamic, exist_ok=True)
        self.metrics_port = free_port()
        static = render("traefik.yml", os.path.join(self.dir, "traefik.yml"), port=self.port,
                        tls_port=self.tls_port, metrics_port=self.metrics_port, dynamic_dir=dynamic)
        render("traefik-dynamic.yml", os.path.join(dynamic, "split.yml"), stable_addr=ups["v1"],
               canary_addr=ups["v2"], stable_weight=int(STABLE_SHARE * 100),
               canary_weight=int(round((1 - STABLE_SHARE) * 100)))
        if self.tls:
            render("traefik-dynamic-tls.yml", os.path.join(dynamic, "tls.yml"), cert=self.tls[0], key=self.tls[1])
        return [tool_bin("traefik"), f"--configFile={static}"]

    def own_counts(self):
        """traefik_service_requests_total per service (stable, canary)."""
        _, _, body = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", 5)
        counts = {}
        for line in body.decode().splitlines():
            m = re.match(r'traefik_service_requests_total\{.*service="([^"@]+)@file".*\} (\S+)', line)
            if m:
                counts[m.group(1)] = counts.get(m.group(1), 0) + int(float(m.group(2)))
        return counts


class Caddy(GoPeer):
    """Caddy: `reverse_proxy` over both upstreams with `lb_policy
    weighted_round_robin 90 10`, no admin API, no automatic HTTPS."""

    binary_name = "caddy"

    def __init__(self, bench, threads, cpus, tls=None):
        super().__init__(bench, "caddy", "Caddy", threads, cpus, tls)

    def configure(self):
        ups = self.upstream_addrs()
        cfg = render("Caddyfile", os.path.join(self.dir, "Caddyfile"), port=self.port, stable_addr=ups["v1"],
                     canary_addr=ups["v2"], stable_weight=int(STABLE_SHARE * 100),
                     canary_weight=int(round((1 - STABLE_SHARE) * 100)))
        if self.tls:
            # The TLS site beside the plain one (Caddyfile site blocks are
            # independent, so appending is enough).
            part = render("Caddyfile.tls", os.path.join(self.dir, "Caddyfile.tls"), tls_port=self.tls_port,
                          cert=self.tls[0], key=self.tls[1])
            with open(part) as f, open(cfg, "a") as out:
                out.write("\n" + f.read())
        return [tool_bin("caddy"), "run", "--config", cfg, "--adapter", "caddyfile"]


def tool_version(name):
    """Traefik's and Caddy's version, for the report."""
    try:
        out = subprocess.run([tool_bin(name), "version"], capture_output=True, text=True, timeout=10).stdout
        # Traefik: "Version:      3.7.15" among other lines; Caddy: "v2.11.7 h1:..."
        m = re.search(r"Version:\s+(\S+)", out) if name == "traefik" else re.match(r"\s*(\S+)", out)
        return f"{name.capitalize()} {m.group(1) if m else '?'}"
    except (RuntimeError, OSError, subprocess.SubprocessError):
        return f"{name} ?"


# --------------------------------------------------------------------------
# load and statistics


# Set by --compare-routing sticky: every request of every system carries a
# random x-user-id (count.lua reads it), so only the routing table differs.
WRK_ENV = {}


def run_wrk(url, seconds, connections=CONNECTIONS):
    cmd = ["taskset", "-c", LOAD_CPUS, "wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s",
           "--timeout", "2s", "-s", LUA, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                         env={**os.environ, **WRK_ENV})
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {out.returncode}) against {url}:\n{out.stdout}\n{out.stderr}")
    r = {}
    for kv in line.split()[1:]:
        k, v = kv.split("=", 1)
        r[k] = v if k == "counts" else int(v)
    counts = {}
    for kv in filter(None, r["counts"].split(",")):
        k, v = kv.split("=")
        counts[k] = int(v)
    r["counts"] = counts
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = (r["err_connect"] + r["err_read"] + r["err_write"] + r["err_timeout"]
                   + sum(n for k, n in counts.items() if k.startswith("status_") or k == "no_version_header"))
    return r


def h2_duration_us(text):
    """h2load's durations: "368us", "10.61ms", "2.99s"."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def run_h2load(url, seconds, watch_ports=(), watch_pids=()):
    """h2load over h2c (prior knowledge), bounded in time; halfway through,
    counts the established connections from `watch_pids` to `watch_ports`
    (a proxy's upstream connections under load)."""
    cmd = ["taskset", "-c", LOAD_CPUS, "h2load", "-c", str(H2_CONNECTIONS), "-m", str(H2_STREAMS),
           "-D", str(seconds), url]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(seconds / 2)  # h2load opens its connections at once: halfway is under full load
        mid = established_to(watch_ports, watch_pids)
        stdout, stderr = p.communicate(timeout=seconds + 60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
    fin = re.search(r"^finished in (\S+), ([\d.]+) req/s", stdout, re.M)
    req = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                    r"(\d+) errored, (\d+) timeout", stdout, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", stdout, re.M)
    lat = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", stdout, re.M)
    proto = re.search(r"^Application protocol: (\S+)", stdout, re.M)
    if p.returncode != 0 or not (fin and req and codes):
        raise RuntimeError(f"h2load failed (exit {p.returncode}) against {url}:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    total, started, done, succeeded, failed, errored, timeout = (int(x) for x in req.groups())
    c2xx, c3xx, c4xx, c5xx = (int(x) for x in codes.groups())
    r = {"requests": done, "started": started, "succeeded": succeeded, "failed": failed, "errored": errored,
         "timeout": timeout, "non_2xx": c3xx + c4xx + c5xx, "rps": float(fin.group(2)),
         "duration_us": h2_duration_us(fin.group(1)),
         # h2load gives no percentiles (only with a per-request log file)
         "mean_us": h2_duration_us(lat.group(3)) if lat else float("nan"),
         "max_us": h2_duration_us(lat.group(2)) if lat else float("nan"),
         "mid_conns": mid, "protocol": proto.group(1) if proto else None}
    # In a timed run h2load's total is the requests done; whatever did not
    # succeed with a 2xx (failed, errored, timed out, 3xx to 5xx) is an error.
    r["errors"] = (total - succeeded) + c3xx
    if done == 0:
        raise RuntimeError(f"h2load got no answer from {url}:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return r


# The open-loop row: oha sends at a fixed rate whatever the answers do, and
# with --latency-correction counts each request's latency from when it was
# due, not from when a free connection sent it, so a stall shows in the tail
# (wrk, closed-loop, waits for an answer before the next request and so hides
# it: coordinated omission). Fractions of HAProxy's closed-loop maximum in the
# same run's headline row.
OPENLOOP_LOADS = (0.5, 0.8)
# --quick measures a dev build on a busy machine: its rates stay small, so that
# it never fails on speed (derived from the quick headline all the same, so
# that code path runs).
QUICK_OPENLOOP_BASE = 2500


def oha_bin():
    return os.environ.get("BENCH_OHA") or shutil.which("oha") or "oha"


def oha_json(flags, url, timeout):
    """oha with `flags` against `url`, on the load core with one worker
    thread, and its JSON report."""
    cmd = ["taskset", "-c", LOAD_CPUS, oha_bin(), *flags, "--worker-threads", "1", "--no-tui",
           "--output-format", "json", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    try:
        data = json.loads(out.stdout)
    except ValueError:
        data = None
    if out.returncode != 0 or not data:
        raise RuntimeError(f"oha failed (exit {out.returncode}) against {url}:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return data


def run_oha(url, rate, seconds, connections=CONNECTIONS):
    """oha at a fixed `rate` for `seconds`, open loop, on the load core."""
    # One tokio worker: oha has one core of its own (two threads would only
    # take turns on it). -w lets the requests in flight at the deadline finish
    # instead of counting them as errors; -t bounds each one, as wrk's --timeout.
    data = oha_json(["-z", f"{seconds}s", "-q", str(rate), "--latency-correction", "-c", str(connections),
                     "-w", "-t", "2s"], url, seconds + 60)
    codes = {int(k): v for k, v in (data.get("statusCodeDistribution") or {}).items()}
    transport = dict(data.get("errorDistribution") or {})
    answered = sum(codes.values())
    if answered == 0:
        raise RuntimeError(f"oha got no answer from {url}: {transport}")
    pct = data["latencyPercentiles"]
    timeouts = sum(n for k, n in transport.items() if "timeout" in k.lower())
    return {
        "requests": answered, "rate": rate, "rps": answered / data["summary"]["total"],
        "p50_us": 1e6 * pct["p50"], "p99_us": 1e6 * pct["p99"], "p999_us": 1e6 * pct["p99.9"],
        "non_2xx": sum(n for c, n in codes.items() if not 200 <= c < 300),
        "transport": sum(transport.values()), "timeouts": timeouts, "transport_kinds": transport,
    }


# Connections of the instructions row: few, so that the proxy (slowed
# about 50x under valgrind) still sees several requests per wake-up, as it
# does at full load.
INSTR_CONNECTIONS = 8


def callgrind_measured(path):
    """The instruction count of the dump callgrind_control -d measured
    wrote next to `path` (callgrind numbers its dumps path.1, path.2...)."""
    for name in sorted(os.listdir(os.path.dirname(path))):
        full = os.path.join(os.path.dirname(path), name)
        if not name.startswith(os.path.basename(path) + "."):
            continue
        with open(full) as f:
            text = f.read()
        if "Trigger: dump measured" in text:
            m = re.search(r"^summary: (\d+)$", text, re.M)
            if m:
                return int(m.group(1))
    raise RuntimeError(f"no callgrind dump with a summary next to {path}")


def draw_chart(path, cpu_rows, openloop):
    """Two panels from this run's own numbers: CPU µs per request per system
    for each row in `cpu_rows` [(row, {system label: µs})], and the open-loop
    p99 per system for each load in `openloop` [(load, {system label: µs})]."""
    import matplotlib
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    systems = []
    for _, vals in list(cpu_rows) + list(openloop):
        systems += [k for k in vals if k not in systems]
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(systems)}
    fig, (ax_cpu, ax_lat) = plt.subplots(1, 2, figsize=(14, 5.5))

    def bars(ax, groups, scale):
        width = 0.8 / max(1, len(systems))
        for gi, (_, vals) in enumerate(groups):
            present = [n for n in systems if n in vals and vals[n] == vals[n]]  # skip NaN
            for si, name in enumerate(present):
                x = gi - 0.4 + width * (si + 0.5)
                v = vals[name] * scale
                ax.bar(x, v, width, color=colour[name], label=name)
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g for g, _ in groups], fontsize=8)
        if not groups:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes)

    bars(ax_cpu, cpu_rows, 1.0)
    ax_cpu.set_ylabel("CPU µs per request (user + kernel)")
    ax_cpu.set_title("CPU per request (lower is better)")
    bars(ax_lat, openloop, 1e-3)
    ax_lat.set_ylabel("p99 latency, ms (log scale)")
    ax_lat.set_yscale("log")
    ax_lat.set_title("Open-loop p99 at a fixed rate (lower is better)")
    # one legend entry per system, in the order they first appear
    handles = {}
    for ax in (ax_cpu, ax_lat):
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 6), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def split_check(counts, expect_single=False):
    """(ok, canary fraction, tolerance, text).

    The canary's share over n answers is binomial(n, 0.1) for a random split
    (canary-proxy) and exact for a weighted round robin (HAProxy, NGINX).
    Allowing 5 standard deviations, sqrt(0.1*0.9/n), plus a 0.2-point slack
    for round robin phase at the cut-off, keeps a false alarm below one in a
    million checks while still catching a split that is off by a point at
    the sample sizes a round produces (tens of thousands of answers).
    """
    v1, v2 = counts.get("v1", 0), counts.get("v2", 0)
    n = v1 + v2
    if expect_single:
        ok = n > 0 and v2 == 0
        return ok, 0.0, 0.0, "n/a (one upstream)" if ok else f"canary answered {v2} (expected none)"
    if n < 1000:
        return False, float("nan"), 0.0, f"too few answers to check ({n})"
    frac = v2 / n
    p = 1 - STABLE_SHARE
    tol = 5 * math.sqrt(p * (1 - p) / n) + 0.002
    ok = abs(frac - p) <= tol
    return ok, frac, tol, f"{100 * (1 - frac):.2f}/{100 * frac:.2f} (±{100 * tol:.2f})"


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_ms(us):
    return f"{us / 1000:.2f}" if us == us else "–"


def fmt_cpu(us):
    return f"{us:.1f}" if us == us else "–"


def fmt_mb(kb):
    return f"{kb / 1024:.1f}" if kb is not None else "–"


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --------------------------------------------------------------------------
# the run


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.proxy_bin = args.proxy_bin
        self.backend_bin = args.backend_bin
        self.workdir = tempfile.mkdtemp(prefix="canary-bench-")
        self.procs = Procs(self.workdir)
        self.failures = []
        self.sections = []
        self.loads = [("start", loadavg())]
        # what the chart draws: (row title, {system label: CPU µs/request})
        # of every summarised row, and the open-loop p99s
        self.chart_cpu = []
        self.chart_openloop = []
        # the summary at the top of the report: (row title, {system label:
        # {measure: value}}), lower is better except for req/s
        self.summary = []

    # -- setup

    def start_upstreams(self):
        self.upstream_addr = {}
        self.upstream_pids = {}
        for version in ("v1", "v2"):
            port = free_port()
            # One tokio worker, pinned with the system under test: the same
            # upstream work for every system.
            p = self.procs.start(f"upstream-{version}",
                                 [self.backend_bin, "--listen", f"127.0.0.1:{port}", "--version", version,
                                  "--drain-delay", "0s", "--shutdown-timeout", "1s"],
                                 UPSTREAM_CPUS, env={"TOKIO_WORKER_THREADS": "1", "RUST_LOG": "warn"})
            self.upstream_addr[version] = f"127.0.0.1:{port}"
            self.upstream_pids[version] = p.pid
            wait_ready(f"http://127.0.0.1:{port}/ping", self.procs, p)
        # A directory of its own: canary-proxy watches the routes file's
        # directory, and the logs written to workdir would make it re-read
        # the file on every log line.
        os.makedirs(os.path.join(self.workdir, "routes"), exist_ok=True)
        self.routes_file = os.path.join(self.workdir, "routes", "routes.toml")
        with open(self.routes_file, "w") as f:
            f.write(f"""[versions.stable]
upstream = "http://{self.upstream_addr['v1']}"
weight = {int(STABLE_SHARE * 100)}

[versions.canary]
upstream = "http://{self.upstream_addr['v2']}"
weight = {int(round((1 - STABLE_SHARE) * 100))}
""")
        self.ping = Upstreams("ping-backend", self.upstream_addr,
                              {v: [pid] for v, pid in self.upstream_pids.items()}, self.routes_file)
        # The same versions over h2c, for the HTTP/2 row (a directory of its
        # own for the same reason).
        os.makedirs(os.path.join(self.workdir, "routes-h2c"), exist_ok=True)
        self.routes_h2c = os.path.join(self.workdir, "routes-h2c", "routes.toml")
        with open(self.routes_h2c, "w") as f:
            f.write(f"""[versions.stable]
upstream = "http://{self.upstream_addr['v1']}"
weight = {int(STABLE_SHARE * 100)}
protocol = "h2c"

[versions.canary]
upstream = "http://{self.upstream_addr['v2']}"
weight = {int(round((1 - STABLE_SHARE) * 100))}
protocol = "h2c"
""")

    def start_static_upstreams(self):
        """The faster upstream pair of the "static upstreams" row: NGINX
        answering `pong` with x-ping-version v1 / v2 (bench/peers/
        nginx-static.conf), one worker each, pinned like ping-backend."""
        addr, pids = {}, {}
        for version in ("v1", "v2"):
            port = free_port()
            prefix = os.path.join(self.workdir, f"upstream-static-{version}")
            os.makedirs(prefix, exist_ok=True)
            cfg = render("nginx-static.conf", os.path.join(prefix, "nginx.conf"), prefix=prefix, port=port,
                         version=version)
            p = self.procs.start(f"upstream-static-{version}", ["nginx", "-p", prefix, "-c", cfg, "-e", "stderr"],
                                 UPSTREAM_CPUS)
            wait_pong(f"http://127.0.0.1:{port}/ping", self.procs, p)
            addr[version] = f"127.0.0.1:{port}"
            # the worker serves (and costs) the requests, not the master
            pids[version] = children(p.pid)
        # canary-proxy's routes to them, in a directory of its own (it
        # watches the routes file's directory)
        os.makedirs(os.path.join(self.workdir, "routes-static"), exist_ok=True)
        routes = os.path.join(self.workdir, "routes-static", "routes.toml")
        with open(routes, "w") as f:
            f.write(f"""[versions.stable]
upstream = "http://{addr['v1']}"
weight = {int(STABLE_SHARE * 100)}

[versions.canary]
upstream = "http://{addr['v2']}"
weight = {int(round((1 - STABLE_SHARE) * 100))}
""")
        return Upstreams("static NGINX", addr, pids, routes)

    def http1_systems(self, threads, upstreams=None, direct=False):
        """Every system of the HTTP/1.1 rows, in report order: canary-proxy
        first (its own counters are read from it), HAProxy, NGINX, Traefik,
        Caddy, and with `direct` the ceiling last. The one place that says
        which systems a row compares, so every row has the same peers.
        `upstreams`: an Upstreams (default: the ping-backend pair)."""
        ups = upstreams or self.ping
        cpus = SUT_CPUS_1 if threads == 1 else SUT_CPUS_2
        systems = [CanaryProxy(self, threads, cpus, routes=ups.routes_file), HAProxy(self, threads, cpus),
                   Nginx(self, threads, cpus), Traefik(self, threads, cpus), Caddy(self, threads, cpus)]
        if direct:
            systems.append(Direct(self))
        for s in systems:
            s.upstreams = ups
        return systems

    def proxy_has(self, flag):
        out = subprocess.run([self.proxy_bin, "run", "--help"], capture_output=True, text=True)
        return flag in out.stdout

    # -- alternating rounds

    def rounds(self, systems, rounds, seconds, warmup, load=None, before=None, after=None, describe=None):
        """A B C A B C ...: every system gets every round, in turn.

        `load(system, seconds, pids)` runs one load (default: wrk) and returns
        its result; `before(system)` and `after(system, result, state)` run
        just outside the CPU measurement (`state` is what `before` returned);
        `describe(result)` is the log line's tail."""
        load = load or (lambda s, secs, _pids: run_wrk(s.url, secs))
        describe = describe or (lambda r: f"p99 {r['p99_us'] / 1000:.2f} ms  cpu {r['cpu_us']:.1f} us/req  "
                                          f"errors {r['errors']}  counts {r['counts']}")
        results = {s.key: [] for s in systems}
        for s in systems:
            if warmup:
                load(s, warmup, [])
        for i in range(rounds):
            order = systems if i % 2 == 0 else list(reversed(systems))
            for s in order:
                state = before(s) if before else None
                pids = s.serving_pids()
                u0, s0 = cpu_seconds(pids)
                r = load(s, seconds, pids)
                u1, s1 = cpu_seconds(pids)
                # CPU time the system under test spent per answered request:
                # the cost per request, and much less sensitive than req/s
                # to what else the machine is doing. User vs kernel says
                # whether the proxy's own code or the syscalls dominate.
                n = r["requests"] if pids and r["requests"] else float("nan")
                r["cpu_us"] = 1e6 * ((u1 - u0) + (s1 - s0)) / n
                r["user_us"] = 1e6 * (u1 - u0) / n
                r["sys_us"] = 1e6 * (s1 - s0) / n
                if after:
                    after(s, r, state)
                results[s.key].append(r)
                log(f"  round {i + 1}/{rounds} {s.label:<18} {r['rps']:>9.0f} req/s  {describe(r)}")
        return results

    def summarise(self, title, systems, results, note, split=True):
        rows = []
        hap = None
        agg = {}
        for s in systems:
            rs = results[s.key]
            rps = [r["rps"] for r in rs]
            counts = {}
            for r in rs:
                for k, n in r["counts"].items():
                    counts[k] = counts.get(k, 0) + n
            per_round = [split_check(r["counts"], isinstance(s, Direct)) for r in rs]
            total = split_check(counts, isinstance(s, Direct))
            ok = total[0] and all(c[0] for c in per_round)
            errors = sum(r["errors"] for r in rs)
            requests = sum(r["requests"] for r in rs)
            a = {
                "rps": med(rps), "min": min(rps), "max": max(rps), "rounds": rps,
                "p50": med([r["p50_us"] for r in rs]), "p99": med([r["p99_us"] for r in rs]),
                "p999": med([r["p999_us"] for r in rs]), "cpu_us": med([r["cpu_us"] for r in rs]),
                "user_us": med([r["user_us"] for r in rs]), "sys_us": med([r["sys_us"] for r in rs]), "errors": errors, "requests": requests,
                "rss": s.rss_kb("VmHWM"), "split_ok": ok, "split_text": total[3],
            }
            agg[s.key] = a
            if not ok and split:
                self.failures.append(f"{title}: {s.label} split off: total {total[3]}; per round "
                                     + "; ".join(c[3] for c in per_round))
            if requests and errors > 0.01 * requests:
                self.failures.append(f"{title}: {s.label} had {errors} errors in {requests} requests")
        hap = agg.get("haproxy")
        lines = [f"### {title}", "", note, "",
                 "| system | req/s (median) | spread min–max (rounds) | × HAProxy req/s | p50 ms | p99 ms | p99.9 ms "
                 "| × HAProxy p99 | CPU µs/request (user + kernel) | errors | peak RSS MB | split stable/canary % (tolerance) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in systems:
            a = agg[s.key]
            # A system that answered nothing (already a failure) must not
            # stop the report from being written.
            spread = (f"{a['min']:.0f}–{a['max']:.0f} ({100 * (a['max'] - a['min']) / a['rps']:.0f}%)"
                      if a["rps"] else "–")
            ratio = f"{a['rps'] / hap['rps']:.2f}" if hap and hap["rps"] else "–"
            p99r = f"{a['p99'] / hap['p99']:.2f}" if hap and hap["p99"] else "–"
            split_cell = a["split_text"] + ("" if a["split_ok"] else " **OFF**")
            lines.append(f"| {s.label} | {a['rps']:.0f} | {spread} | {ratio} | {fmt_ms(a['p50'])} | "
                         f"{fmt_ms(a['p99'])} | {fmt_ms(a['p999'])} | {p99r} | {fmt_cpu(a['cpu_us'])} ({fmt_cpu(a['user_us'])} + {fmt_cpu(a['sys_us'])}) | {a['errors']} | {fmt_mb(a['rss'])} | "
                         f"{split_cell} |")
        lines.append("")
        lines.append("Per-round req/s: " + "; ".join(
            f"{s.label} " + ", ".join(f"{x:.0f}" for x in agg[s.key]["rounds"]) for s in systems))
        lines.append("")
        self.sections.append("\n".join(lines))
        self.chart_cpu.append((title, {s.label: agg[s.key]["cpu_us"] for s in systems if not isinstance(s, Direct)}))
        self.summary.append((title, {s.label: {"CPU µs/request": agg[s.key]["cpu_us"], "req/s": agg[s.key]["rps"]}
                                     for s in systems if not isinstance(s, Direct)}))
        return agg

    def headline_systems(self, threads, cpus=None):
        """The HTTP/1.1 systems of the headline row, in its order (the
        proxies of `http1_systems`); the open-loop row measures the same
        list."""
        return self.http1_systems(threads)

    def throughput_phase(self, threads, include_direct, rounds, upstreams=None):
        cpus = SUT_CPUS_1 if threads == 1 else SUT_CPUS_2
        systems = self.http1_systems(threads, upstreams, direct=include_direct)
        log(f"throughput, {threads} worker thread(s), proxies on CPU {cpus}"
            f"{', static upstreams' if upstreams else ''}: starting {', '.join(s.label for s in systems)}")
        try:
            for s in systems:
                s.start(self.procs)
            load_before = loadavg()
            res = self.rounds(systems, rounds, self.args.duration, self.args.warmup)
            if upstreams:
                title = (f"Static upstreams: one worker thread each, upstreams a static NGINX `pong` (proxy and "
                         f"upstreams on core {cpus}, wrk on core {LOAD_CPUS})")
            elif threads == 1:
                title = f"Headline: one worker thread each (proxy and upstreams on core {cpus}, wrk on core {LOAD_CPUS})"
            else:
                title = (f"Second figure: two worker threads each (proxy on cores {cpus}, upstreams on core "
                         f"{UPSTREAM_CPUS}, wrk on core {LOAD_CPUS})")
            note = (f"`wrk -t{WRK_THREADS} -c{CONNECTIONS} -d{self.args.duration}s`, {rounds} round(s) alternating "
                    f"(A B C …, then … C B A), {self.args.warmup}s warm-up each; load average before {load_before}, "
                    f"after {loadavg()}. canary-proxy `--threads {threads}`, HAProxy `nbthread {threads}`, NGINX "
                    f"`worker_processes {threads}`, Traefik and Caddy `GOMAXPROCS={threads}`. Peak RSS is VmHWM of "
                    f"the serving process(es) at the end (NGINX: its worker(s), not the master).")
            if upstreams:
                note += (" The upstreams are two NGINX processes answering `return 200 \"pong\"` with "
                         "`add_header x-ping-version v1` / `v2` (bench/peers/nginx-static.conf), one worker each on "
                         f"core {UPSTREAM_CPUS}: cheaper per request than ping-backend, so each proxy's own cost is "
                         "a bigger share of what is measured. The direct row is wrk straight to the stable one "
                         "(its CPU is that NGINX worker's).")
            agg = self.summarise(title, systems, res, note)
            self.sections.append(self.peer_ratios(agg))
            cp = systems[0]
            own = cp.own_counts()
            n = sum(own.values())
            if n:
                self.sections.append(
                    f"canary-proxy's own counters (`canary_proxy_requests_total`, warm-up included): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(own.items()))
                    + f" — canary share {100 * own.get('canary', 0) / n:.2f}%.\n")
            self.traefik_counters(systems)
            return agg
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)

    def static_phase(self, rounds):
        """The headline row again, every system pointed at the faster
        static NGINX upstreams (started for this row, stopped after it)."""
        static = self.start_static_upstreams()
        try:
            return self.throughput_phase(1, include_direct=True, rounds=rounds, upstreams=static)
        finally:
            for name in ("upstream-static-v1", "upstream-static-v2"):
                for p in [p for p in self.procs.live if p.bench_name == name]:
                    self.procs.stop(p)

    def instructions_phase(self, requests, other_bin=None):
        """User-space instructions per request, counted by callgrind, on the
        static upstreams: canary-proxy (and with --compare the other build)
        against HAProxy. Unlike CPU time, an instruction count does not move
        with the host's load (repeat runs agree within 0.5%), so this row
        can resolve a change of a few percent that the timed rows cannot.
        It leaves out the kernel's share, most of a request's CPU here, and
        what a cache miss or a branch costs: it ranks user-space work, not
        speed."""
        static = self.start_static_upstreams()
        warmup = max(requests // 10, 100)
        systems = [CanaryProxy(self, 1, SUT_CPUS_1, routes=static.routes_file)]
        if other_bin:
            systems.append(CanaryProxy(self, 1, SUT_CPUS_1, routes=static.routes_file, binary=other_bin,
                                       label="canary-proxy (compared)"))
        systems.append(HAProxy(self, 1, SUT_CPUS_1))
        rows = []
        try:
            for i, s in enumerate(systems):
                s.upstreams = static
                out = os.path.join(self.workdir, f"callgrind-{i}.out")
                s.wrap = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
                s.start(self.procs)
                # Warm: connections to the upstreams open, buffers and the
                # allocator at their steady size; then count from zero.
                self.oha_count(s.url, warmup)
                subprocess.run(["callgrind_control", "-z", str(s.proc.pid)], check=True, capture_output=True)
                answered = self.oha_count(s.url, requests)
                subprocess.run(["callgrind_control", "-d", "measured", str(s.proc.pid)], check=True,
                               capture_output=True)
                count = callgrind_measured(out)
                self.procs.stop(s.proc)
                if answered != requests:
                    self.failures.append(f"instructions row: {s.label} answered {answered} of {requests} "
                                         f"with 200")
                rows.append((s.label, count / answered if answered else float("nan")))
                log(f"instructions: {s.label}: {count} over {answered} requests")
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)
            for name in ("upstream-static-v1", "upstream-static-v2"):
                for p in [p for p in self.procs.live if p.bench_name == name]:
                    self.procs.stop(p)
        base = rows[-1][1]
        lines = ["### Instructions per request (callgrind, static upstreams)", "",
                 f"`valgrind --tool=callgrind`, one worker thread each; {warmup} requests to warm up, then "
                 f"the counters are zeroed and {requests} requests are counted, from oha `-n {requests} "
                 f"-c {INSTR_CONNECTIONS}` over keep-alive, 90/10 to the static NGINX upstreams. User space "
                 f"only (the process and its libraries); the kernel's part of each request is not in it.", "",
                 "| system | instructions per request | vs HAProxy |", "|---|---|---|"]
        for label, per in rows:
            lines.append(f"| {label} | {per:,.0f} | {per / base:.2f}× |")
        self.sections.append("\n".join(lines) + "\n")
        self.summary.append(("Instructions per request (callgrind)",
                             {label: {"instructions": per} for label, per in rows}))
        return rows

    def oha_count(self, url, n):
        """Answers with status 200 to `n` requests from oha, closed loop."""
        data = oha_json(["-n", str(n), "-c", str(INSTR_CONNECTIONS)], url, 600)
        return int((data.get("statusCodeDistribution") or {}).get("200", 0))

    def peer_ratios(self, agg):
        """canary-proxy's CPU per request and req/s as a ratio to each peer's
        in one table (the issue asks for the ratios against every peer)."""
        cp = agg.get("canary-proxy")
        peers = [(k, a) for k, a in agg.items() if k not in ("canary-proxy", "direct")]
        if not cp or not peers:
            return ""
        cells = []
        for key, a in peers:
            label = {"haproxy": "HAProxy", "nginx": "NGINX", "traefik": "Traefik", "caddy": "Caddy"}.get(key, key)
            cpu = cp["cpu_us"] / a["cpu_us"] if a["cpu_us"] else float("nan")
            rps = cp["rps"] / a["rps"] if a["rps"] else float("nan")
            cells.append(f"{label}: CPU/request {cpu:.2f}×, req/s {rps:.2f}×")
        return "canary-proxy against each peer (below 1× CPU and above 1× req/s is ahead): " + "; ".join(cells) + ".\n"

    def traefik_counters(self, systems):
        """Traefik's own per-service counters, as a cross-check of the split
        and a check that the metrics whose cost was measured were on."""
        for s in systems:
            if isinstance(s, Traefik) and s.proc:
                own = s.own_counts()
                n = own.get("stable", 0) + own.get("canary", 0)
                if not n:
                    self.failures.append(f"Traefik's metrics counted no request per service: {own}")
                    continue
                self.sections.append(
                    "Traefik's own counters (`traefik_service_requests_total`, warm-up included): "
                    + ", ".join(f"{k} {v}" for k, v in sorted(own.items()))
                    + f" — canary share {100 * own.get('canary', 0) / n:.2f}%.\n")

    def routing_routes(self, kind):
        """The headline routes file plus one routing table (docs/routing.md),
        in a directory of its own (canary-proxy watches it)."""
        extra = {
            # Every request has a key (count.lua sends a random one).
            "sticky": '\n[sticky]\nheader = "x-user-id"\n',
            # The table is there, and copies nothing.
            "mirror-0": '\n[mirror]\nversion = "canary"\nshare = 0.0\n',
        }[kind]
        d = os.path.join(self.workdir, f"routes-{kind}")
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, "routes.toml")
        with open(self.routes_file) as f, open(path, "w") as out:
            out.write(f.read() + extra)
        return path

    def compare_phase(self, other_bin, rounds):
        """This build against another canary-proxy binary, or against itself
        with one routing table added (--compare-routing), with HAProxy as the
        yardstick: the headline setup only, for checking one change."""
        threads = self.args.compare_threads
        cpus = SUT_CPUS_1 if threads == 1 else SUT_CPUS_2
        kind = self.args.compare_routing
        tls = pem = None
        if self.args.compare_tls and not kind:
            # the TLS row's setup: both builds and HAProxy behind TLS listeners
            cert, key, pem = self.tls_files()
            tls = (cert, key)
        if kind:
            if kind == "sticky":
                WRK_ENV["BENCH_USER_KEYS"] = "1"
            other = CanaryProxy(self, threads, cpus, routes=self.routing_routes(kind),
                                label=f"canary-proxy (+{kind})")
            other_bin = f"this build with routes + {kind}"
        else:
            other = CanaryProxy(self, threads, cpus, tls=tls, binary=other_bin, label="canary-proxy (compared)")
        systems = [CanaryProxy(self, threads, cpus, tls=tls), other, HAProxy(self, threads, cpus, tls_pem=pem)]
        log(f"compare: {self.proxy_bin} against {other_bin}, {threads} worker thread(s), on CPU {cpus}")
        try:
            for s in systems:
                s.start(self.procs)
            load_before = loadavg()
            res = self.rounds(systems, rounds, self.args.duration, self.args.warmup)
            over = " over TLS (the TLS row's setup)" if tls else ""
            note = (f"This build against `{other_bin}`{over}. `wrk -t{WRK_THREADS} -c{CONNECTIONS} "
                    f"-d{self.args.duration}s`, {rounds} rounds alternating, {self.args.warmup}s warm-up each; "
                    f"load average before {load_before}, after {loadavg()}.")
            return self.summarise(f"Compare: {threads} worker thread(s) each", systems, res, note)
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)

    def tls_phase(self, rounds):
        title = ("TLS on the front door: canary-proxy against HAProxy, Traefik and Caddy (one worker thread, "
                 "same pinning)")
        if not self.proxy_has("--tls-listen"):
            self.sections.append(f"### {title}\n\nnot available: canary-proxy has no --tls-listen\n")
            log("TLS: not available: canary-proxy has no --tls-listen")
            return None
        cert, key, pem = self.tls_files()
        systems = [CanaryProxy(self, 1, SUT_CPUS_1, tls=(cert, key)), HAProxy(self, 1, SUT_CPUS_1, tls_pem=pem),
                   Traefik(self, 1, SUT_CPUS_1, tls=(cert, key)), Caddy(self, 1, SUT_CPUS_1, tls=(cert, key))]
        log(f"TLS: starting {', '.join(s.label for s in systems)} with TLS listeners")
        try:
            for s in systems:
                s.start(self.procs)
            res = self.rounds(systems, rounds, self.args.duration, self.args.warmup)
            note = (f"Self-signed ECDSA P-256 certificate, HTTP/1.1 over TLS with keep-alive (one handshake per "
                    f"connection), {rounds} round(s) of `wrk -t{WRK_THREADS} -c{CONNECTIONS} -d{self.args.duration}s`. "
                    f"The same certificate and key for every system (Traefik: its default certificate; Caddy: "
                    f"`tls CERT KEY`).")
            agg = self.summarise(title, systems, res, note)
            self.sections.append(self.peer_ratios(agg))
            return agg
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)

    def h2_phase(self, rounds):
        """HTTP/2 end to end, gRPC-shaped: many concurrent streams over few
        client connections, h2c to the front door and h2c to the upstreams."""
        title = (f"HTTP/2 end to end (gRPC-shaped): h2c in, h2c to the upstreams (one worker thread, "
                 f"core {SUT_CPUS_1})")
        systems = [CanaryProxy(self, 1, SUT_CPUS_1, routes=self.routes_h2c), HAProxy(self, 1, SUT_CPUS_1, h2=True),
                   Nginx(self, 1, SUT_CPUS_1, h2=True), Direct(self, h2=True)]
        seconds, warmup = self.args.duration, self.args.warmup
        upstream_ports = {v: int(addr.rsplit(":", 1)[1]) for v, addr in self.upstream_addr.items()}
        log(f"HTTP/2: starting {', '.join(s.label for s in systems)}")
        try:
            for s in systems:
                s.start(self.procs)
            # HAProxy, NGINX and direct were checked over h2c as they started;
            # canary-proxy's readiness check is HTTP/1.1, so check h2c here.
            wait_pong_h2c(systems[0].url, self.procs, systems[0].proc)
            load_before = loadavg()

            def load(s, secs, pids):
                # the upstream connections of a proxy, not h2load's own (direct)
                r = run_h2load(s.url, secs, upstream_ports.values(), [] if isinstance(s, Direct) else pids)
                r["mid_conns"] = {v: r["mid_conns"].get(port, 0) for v, port in upstream_ports.items()}
                return r

            def before(s):
                return s.split_counts() if hasattr(s, "split_counts") else None

            def after(s, r, counts_before):
                r["counts"] = {} if counts_before is None else self.h2_counts_since(s, counts_before, r["requests"])

            results = self.rounds(systems, rounds, seconds, warmup, load, before, after, describe=lambda r: (
                f"mean {r['mean_us'] / 1000:.2f} ms  cpu {r['cpu_us']:.1f} us/req  errors {r['errors']}  "
                f"counts {r['counts']}  upstream conns mid-load {r['mid_conns']}"))
            opened = {s.key: s.upstream_connections() for s in systems if hasattr(s, "upstream_connections")}
            note = (f"`h2load -c {H2_CONNECTIONS} -m {H2_STREAMS} -D {seconds} http://127.0.0.1:PORT/ping` "
                    f"(h2c with prior knowledge, one h2load thread on core {LOAD_CPUS}): {H2_CONNECTIONS} client "
                    f"connections with {H2_STREAMS} streams in flight on each, as gRPC clients multiplex. "
                    f"{rounds} round(s) alternating, a {warmup}s h2load warm-up each; load average before "
                    f"{load_before}, after {loadavg()}. Each proxy speaks h2c to both upstreams, split 90/10: "
                    f"canary-proxy `protocol = \"h2c\"` on both versions (`--threads 1`); HAProxy `bind ... proto h2`, "
                    f"`server ... proto h2`, `balance roundrobin` with weights 90/10 (`nbthread 1`); NGINX "
                    f"{'`http2 on`' if nginx_version() >= (1, 25, 1) else '`listen ... http2`'} and `grpc_pass "
                    f"grpc://versions` to a weighted upstream block (`worker_processes 1`); direct is h2load "
                    f"straight to the stable ping-backend (its CPU is the upstream's own). h2load cannot read "
                    f"the `x-ping-version` header, so the split is counted by each system: canary-proxy's "
                    f"`canary_proxy_requests_total`, HAProxy's per-server `stot` (stats socket), NGINX's "
                    f"buffered access log of `$upstream_addr` (its only per-upstream count; a small cost the "
                    f"HTTP/1.1 rows do not pay). Latency is h2load's mean time per request (it reports no "
                    f"percentiles). Errors: every request that did not end in a 2xx (h2load's failed, errored, "
                    f"timeout and 3xx–5xx). Upstream connections: those the system's own processes held open "
                    f"to each upstream (stable/canary) halfway through the load (from /proc), median over rounds, and opened in the whole run by the system's "
                    f"own counter (canary-proxy `canary_proxy_upstream_connections_opened_total`, HAProxy "
                    f"`connect`; NGINX has none).")
            return self.h2_summarise(title, systems, results, note, opened)
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)

    def h2_counts_since(self, s, before, done, deadline_s=5.0):
        """Answers per upstream during one load. A system may count an
        answer a moment after h2load saw it (NGINX flushes its log each
        second), so poll until it has counted at least the requests done."""
        end = time.monotonic() + deadline_s
        while True:
            after = s.split_counts()
            delta = {v: after.get(v, 0) - before.get(v, 0) for v in ("v1", "v2")}
            if sum(delta.values()) >= done or time.monotonic() > end:
                return delta
            time.sleep(0.1)

    def h2_summarise(self, title, systems, results, note, opened):
        agg = {}
        for s in systems:
            rs = results[s.key]
            rps = [r["rps"] for r in rs]
            direct = isinstance(s, Direct)
            counts = {}
            for r in rs:
                for k, n in r["counts"].items():
                    counts[k] = counts.get(k, 0) + n
            per_round = [split_check(r["counts"]) for r in rs] if not direct else []
            total = split_check(counts) if not direct else (True, 0.0, 0.0, "n/a (one upstream)")
            ok = total[0] and all(c[0] for c in per_round)
            errors = sum(r["errors"] for r in rs)
            requests = sum(r["requests"] for r in rs)
            a = {"rps": med(rps), "min": min(rps), "max": max(rps), "rounds": rps,
                 "mean": med([r["mean_us"] for r in rs]), "cpu_us": med([r["cpu_us"] for r in rs]),
                 "user_us": med([r["user_us"] for r in rs]), "sys_us": med([r["sys_us"] for r in rs]),
                 "errors": errors, "requests": requests, "split_ok": ok, "split_text": total[3],
                 "failed": sum(r["failed"] for r in rs), "errored": sum(r["errored"] for r in rs),
                 "timeout": sum(r["timeout"] for r in rs), "non_2xx": sum(r["non_2xx"] for r in rs),
                 "mid": {v: med([r["mid_conns"][v] for r in rs]) for v in ("v1", "v2")},
                 "opened": opened.get(s.key)}
            agg[s.key] = a
            if not ok:
                self.failures.append(f"{title}: {s.label} split off: total {total[3]}; per round "
                                     + "; ".join(c[3] for c in per_round))
            # Unlike the HTTP/1.1 rows, not one error is tolerated: nothing
            # here should fail, so any failure is the harness or a system broken.
            if errors:
                self.failures.append(f"{title}: {s.label} had {errors} errors in {requests} requests "
                                     f"(h2load: {a['failed']} failed, {a['errored']} errored, {a['timeout']} "
                                     f"timeout, {a['non_2xx']} 3xx-5xx)")
        hap = agg.get("haproxy")
        lines = [f"### {title}", "", note, "",
                 "| system | req/s (median) | spread min–max (rounds) | × HAProxy req/s | mean ms "
                 "| CPU µs/request (user + kernel) | requests | errors | upstream conns under load stable/canary "
                 "| upstream conns opened stable/canary | split stable/canary % (tolerance) |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for s in systems:
            a = agg[s.key]
            spread = f"{a['min']:.0f}–{a['max']:.0f} ({100 * (a['max'] - a['min']) / a['rps']:.0f}%)"
            ratio = f"{a['rps'] / hap['rps']:.2f}" if hap else "–"
            err = (str(a["errors"]) if not a["errors"] else
                   f"**{a['errors']}** ({a['failed']} failed, {a['errored']} errored, {a['timeout']} timeout, "
                   f"{a['non_2xx']} 3xx–5xx)")
            if isinstance(s, Direct):
                mid = f"– (h2load's {H2_CONNECTIONS})"
            else:
                mid = f"{a['mid']['v1']:.0f}/{a['mid']['v2']:.0f}"
            op = f"{a['opened']['v1']}/{a['opened']['v2']}" if a["opened"] else "–"
            split_cell = a["split_text"] + ("" if a["split_ok"] else " **OFF**")
            lines.append(f"| {s.label} | {a['rps']:.0f} | {spread} | {ratio} | {fmt_ms(a['mean'])} | "
                         f"{fmt_cpu(a['cpu_us'])} ({fmt_cpu(a['user_us'])} + {fmt_cpu(a['sys_us'])}) | "
                         f"{a['requests']} | {err} | {mid} | {op} | {split_cell} |")
        lines.append("")
        lines.append("Per-round req/s: " + "; ".join(
            f"{s.label} " + ", ".join(f"{x:.0f}" for x in agg[s.key]["rounds"]) for s in systems))
        cp = agg.get("canary-proxy")
        if cp and cp["opened"]:
            lines += ["", f"canary-proxy upstream connections opened in the whole run (warm-up included; "
                      f"`canary_proxy_upstream_connections_opened_total`): stable {cp['opened']['v1']}, canary "
                      f"{cp['opened']['v2']}, for {H2_CONNECTIONS} client connections with {H2_STREAMS} streams "
                      f"each ({H2_CONNECTIONS * H2_STREAMS} requests in flight)."]
        lines.append("")
        self.sections.append("\n".join(lines))
        self.chart_cpu.append((title, {s.label: agg[s.key]["cpu_us"] for s in systems if not isinstance(s, Direct)}))
        self.summary.append((title, {s.label: {"CPU µs/request": agg[s.key]["cpu_us"], "req/s": agg[s.key]["rps"]}
                                     for s in systems if not isinstance(s, Direct)}))
        return agg

    def tls_files(self):
        """(cert, key, combined pem): a self-signed ECDSA P-256 pair, made
        once per run and shared by the rows that serve TLS."""
        # A directory of their own, as a mounted Secret has: canary-proxy
        # watches the certificate's directory, and the process logs written
        # to workdir would make it re-read the pair on every line.
        tls_dir = os.path.join(self.workdir, "tls")
        cert, key, pem = (os.path.join(tls_dir, n) for n in ("cert.pem", "key.pem", "combined.pem"))
        if os.path.exists(pem):
            return cert, key, pem
        os.makedirs(tls_dir, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
        with open(pem, "w") as out:
            for part in (cert, key):
                with open(part) as f:
                    out.write(f.read())
        return cert, key, pem

    def openloop_phase(self, head, rounds):
        """Latency at fixed rates (open loop, oha): every HTTP/1.1 system of
        the headline, one worker thread, at fractions of HAProxy's maximum
        in the headline row."""
        title = (f"Open loop: latency at fixed rates (one worker thread, core {SUT_CPUS_1}; oha on core "
                 f"{LOAD_CPUS})")
        if not head or "haproxy" not in head or not head["haproxy"]["rps"] > 0:
            self.failures.append(f"{title}: no HAProxy maximum from the headline row to derive the rates from")
            return None
        base = head["haproxy"]["rps"]
        if self.quick:
            base = min(base, QUICK_OPENLOOP_BASE)
        rates = {frac: max(100, int(round(frac * base))) for frac in OPENLOOP_LOADS}
        systems = [s for s in self.headline_systems(1, SUT_CPUS_1) if not isinstance(s, Direct)]
        # --quick checks the harness, not speed: no warm-up, to keep it short
        seconds, warmup = self.args.duration, 0 if self.quick else self.args.warmup
        log(f"open loop: {', '.join(s.label for s in systems)} at "
            + ", ".join(f"{r} req/s" for r in rates.values()))
        try:
            for s in systems:
                s.start(self.procs)
            load_before = loadavg()
            results = {}
            for i, (frac, rate) in enumerate(rates.items()):
                log(f"open loop at {100 * frac:.0f}% of HAProxy's maximum: {rate} req/s")
                results[frac] = self.rounds(
                    systems, rounds, seconds, warmup if i == 0 else 0,
                    load=lambda s, secs, _pids, rate=rate: run_oha(s.url, rate, secs),
                    describe=lambda r: (f"p50 {r['p50_us'] / 1000:.2f} ms  p99 {r['p99_us'] / 1000:.2f} ms  "
                                        f"p99.9 {r['p999_us'] / 1000:.2f} ms  cpu {r['cpu_us']:.1f} us/req  "
                                        f"non-2xx {r['non_2xx']}  transport errors {r['transport_kinds'] or 0}"))
            oha_version = subprocess.run([oha_bin(), "--version"], capture_output=True, text=True).stdout.strip()
            note = (f"`{oha_version}`: `oha -q RATE --latency-correction -c {CONNECTIONS} -z {seconds}s -w -t 2s "
                    f"--worker-threads 1`, pinned to core {LOAD_CPUS}; systems as in the headline (one worker "
                    f"thread each, with the upstreams on core {SUT_CPUS_1}). The rates are "
                    + " and ".join(f"{100 * f:.0f}%" for f in rates)
                    + f" of HAProxy's median req/s in this run's headline row ({head['haproxy']['rps']:.0f}"
                    + (f", capped at {QUICK_OPENLOOP_BASE} in --quick" if self.quick else "")
                    + f"). wrk is closed-loop: a slow answer delays the next request, so a stall hides "
                    f"from its percentiles (coordinated omission). oha sends at the fixed rate whatever the "
                    f"answers do, and with `--latency-correction` counts each latency from when the request "
                    f"was due. {rounds} round(s) alternating per rate, a {warmup}s warm-up at the first rate; "
                    f"load average before {load_before}, after {loadavg()}. Achieved: answers per second "
                    f"(below the target when a system cannot keep up). Errors: non-2xx answers, and transport "
                    f"errors (of which timeouts, over 2 s). oha cannot read the `x-ping-version` header, so "
                    f"the split is not counted here; it is checked on the same systems and configuration in "
                    f"the headline row, and here every answer must be a 2xx.")
            return self.openloop_summarise(title, systems, results, rates, note)
        finally:
            for s in systems:
                if s.proc:
                    self.procs.stop(s.proc)

    def openloop_summarise(self, title, systems, results, rates, note):
        agg = {}
        lines = [f"### {title}", "", note, "",
                 "| load | system | target req/s | achieved req/s (median) | p50 ms | p99 ms | p99.9 ms "
                 "| × HAProxy p99 | × HAProxy p99.9 | CPU µs/request (user + kernel) | errors: non-2xx / transport "
                 "(timeouts) |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for frac, rate in rates.items():
            agg[frac] = {}
            for s in systems:
                rs = results[frac][s.key]
                a = {"rate": rate, "rps": med([r["rps"] for r in rs]),
                     "p50": med([r["p50_us"] for r in rs]), "p99": med([r["p99_us"] for r in rs]),
                     "p999": med([r["p999_us"] for r in rs]), "cpu_us": med([r["cpu_us"] for r in rs]),
                     "user_us": med([r["user_us"] for r in rs]), "sys_us": med([r["sys_us"] for r in rs]),
                     "non_2xx": sum(r["non_2xx"] for r in rs), "transport": sum(r["transport"] for r in rs),
                     "timeouts": sum(r["timeouts"] for r in rs), "requests": sum(r["requests"] for r in rs)}
                agg[frac][s.key] = a
                # A wrong answer or a broken connection is a fault; a timeout
                # or a shortfall of the rate is a system that cannot keep up
                # (speed), reported but not failed.
                hard = a["non_2xx"] + a["transport"] - a["timeouts"]
                if hard:
                    kinds = {}
                    for r in rs:
                        for k, n in r["transport_kinds"].items():
                            kinds[k] = kinds.get(k, 0) + n
                    self.failures.append(f"{title}: {s.label} at {rate} req/s: {a['non_2xx']} non-2xx answers, "
                                         f"transport errors {kinds}")
            hap = agg[frac].get("haproxy")
            for s in systems:
                a = agg[frac][s.key]
                p99r = f"{a['p99'] / hap['p99']:.2f}" if hap and hap["p99"] else "–"
                p999r = f"{a['p999'] / hap['p999']:.2f}" if hap and hap["p999"] else "–"
                short = " (**short**)" if a["rps"] < 0.95 * rate else ""
                errors = f"{a['non_2xx']} / {a['transport']} ({a['timeouts']})"
                if a["non_2xx"] or a["transport"]:
                    errors = f"**{errors}**"
                lines.append(f"| {100 * frac:.0f}% | {s.label} | {rate} | {a['rps']:.0f}{short} | {fmt_ms(a['p50'])} "
                             f"| {fmt_ms(a['p99'])} | {fmt_ms(a['p999'])} | {p99r} | {p999r} | "
                             f"{fmt_cpu(a['cpu_us'])} ({fmt_cpu(a['user_us'])} + {fmt_cpu(a['sys_us'])}) | {errors} |")
        lines.append("")
        self.sections.append("\n".join(lines))
        self.chart_openloop = [(f"{100 * frac:.0f}% load ({rate} req/s)",
                                {s.label: agg[frac][s.key]["p99"] for s in systems})
                               for frac, rate in sorted(rates.items(), reverse=True)]
        for frac, rate in sorted(rates.items(), reverse=True):
            self.summary.append((f"Open loop, {100 * frac:.0f}% load ({rate} req/s)",
                                 {s.label: {"p99 ms": agg[frac][s.key]["p99"] / 1000,
                                            "p99.9 ms": agg[frac][s.key]["p999"] / 1000} for s in systems}))
        return agg

    def h2front_phase(self, rounds):
        """HTTP/2 on the front door only, as browsers and gRPC clients reach
        a proxy: (a) h2c with prior knowledge on the plain port, (b) h2 over
        TLS (ALPN) on the TLS port; HTTP/1.1 with keep-alive to the upstreams."""
        if not self.proxy_has("--tls-listen"):
            self.sections.append("### HTTP/2 front door\n\nnot available: canary-proxy has no --tls-listen\n")
            return None
        cert, key, pem = self.tls_files()
        # --quick checks the harness, not speed: no warm-up, to keep it short
        seconds, warmup = self.args.duration, 0 if self.quick else self.args.warmup
        upstream_ports = {v: int(addr.rsplit(":", 1)[1]) for v, addr in self.upstream_addr.items()}
        out = {}
        for mode, expect, what in (("h2c", "h2c", "h2c (prior knowledge)"), ("tls", "h2", "h2 over TLS (ALPN)")):
            title = (f"HTTP/2 front door, {what}: HTTP/1.1 to the upstreams (one worker thread, "
                     f"core {SUT_CPUS_1})")
            # Fresh processes for each half, so that their counters (upstream
            # connections opened) are this half's own.
            systems = [CanaryProxy(self, 1, SUT_CPUS_1, tls=(cert, key)), HAProxyH2Front(self, 1, SUT_CPUS_1, pem),
                       NginxH2Front(self, 1, SUT_CPUS_1, cert, key)]
            log(f"HTTP/2 front door ({mode}): starting {', '.join(s.label for s in systems)}")
            try:
                for s in systems:
                    s.start(self.procs)
                # canary-proxy's readiness check is HTTP/1.1: check h2 on both ports
                wait_pong_h2c(systems[0].plain_url, self.procs, systems[0].proc)
                wait_pong_h2c(systems[0].url, self.procs, systems[0].proc)
                load_before = loadavg()

                def load(s, secs, pids, mode=mode, expect=expect):
                    r = run_h2load(s.plain_url if mode == "h2c" else s.url, secs, upstream_ports.values(), pids)
                    # h2load falls back to HTTP/1.1 if ALPN offers no h2: that would measure another row
                    if r["protocol"] != expect:
                        raise RuntimeError(f"h2load spoke {r['protocol']} to {s.label}, not {expect}")
                    r["mid_conns"] = {v: r["mid_conns"].get(port, 0) for v, port in upstream_ports.items()}
                    return r

                def after(s, r, counts_before):
                    r["counts"] = self.h2_counts_since(s, counts_before, r["requests"])

                results = self.rounds(systems, rounds, seconds, warmup, load, lambda s: s.split_counts(), after,
                                      describe=lambda r: (f"mean {r['mean_us'] / 1000:.2f} ms  cpu "
                                                          f"{r['cpu_us']:.1f} us/req  errors {r['errors']}  "
                                                          f"counts {r['counts']}  upstream conns mid-load "
                                                          f"{r['mid_conns']}"))
                opened = {s.key: s.upstream_connections() for s in systems if hasattr(s, "upstream_connections")}
                scheme = "http" if mode == "h2c" else "https"
                note = (f"`h2load -c {H2_CONNECTIONS} -m {H2_STREAMS} -D {seconds} {scheme}://127.0.0.1:PORT/ping` "
                        f"(one h2load thread on core {LOAD_CPUS}; h2load reported protocol `{expect}` in every "
                        f"round): {H2_CONNECTIONS} client connections with {H2_STREAMS} streams in flight on each, "
                        f"as browsers and gRPC clients multiplex. Every proxy speaks HTTP/1.1 with keep-alive to "
                        f"both upstreams, split 90/10, as in the headline (the gRPC-shaped row is h2c end to end). "
                        f"canary-proxy `--threads 1` with `--tls-listen` (h2c with prior knowledge on the plain "
                        f"port, ALPN h2 on the TLS port); HAProxy `bind ... proto h2` and `bind ... ssl crt ... "
                        f"alpn h2,http/1.1`, `http-reuse always` (`nbthread 1`); NGINX "
                        f"{'`http2 on`' if nginx_version() >= (1, 25, 1) else '`listen ... http2` and `listen ... ssl http2`'}, "
                        f"`proxy_pass` over HTTP/1.1 with `keepalive 1024` (`worker_processes 1`). The TLS "
                        f"certificate is the TLS row's (self-signed ECDSA P-256). {rounds} round(s) alternating, a "
                        f"{warmup}s warm-up each; load average before {load_before}, after {loadavg()}. The split "
                        f"is counted by each system, as in the gRPC-shaped row (canary-proxy's "
                        f"`canary_proxy_requests_total`, HAProxy's per-server `stot`, NGINX's buffered access "
                        f"log of `$upstream_addr`); the other columns as there.")
                out[mode] = self.h2_summarise(title, systems, results, note, opened)
            finally:
                for s in systems:
                    if s.proc:
                        self.procs.stop(s.proc)
        return out

    def write_chart(self, path):
        """The report's chart (draw_chart) from the rows this run measured:
        CPU per request of each one-thread row, and the open-loop p99."""
        # a row's name is its title up to the colon ("Headline", "TLS on the front door", ...)
        cpu_rows = [(textwrap.fill(row.split(":")[0], 18), vals) for row, vals in self.chart_cpu
                    if not row.startswith(("Second figure", "Compare"))]  # two threads, or an A/B: not comparable
        draw_chart(path, cpu_rows, self.chart_openloop)

    def idle_phase(self, n, hold):
        title = f"Memory with {n} idle keep-alive client connections (one worker thread, core {SUT_CPUS_1})"
        systems = self.http1_systems(1)
        lines = [f"### {title}", "",
                 f"Each client connection sends one `GET /ping` over keep-alive, reads the answer and then stays "
                 f"open and idle (client on core {LOAD_CPUS}, at most 200 connections being set up at once). RSS "
                 f"is read {IDLE_SETTLE:.0f}s after the last one opened; 'still open' is counted {hold:.0f}s after "
                 f"it, which shows a server's idle keep-alive timeout if it is shorter.", "",
                 "| system | RSS before MB | RSS with connections MB | peak RSS MB | KB per connection | opened "
                 f"| still open after {hold:.0f}s | failed |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        results = {}
        lines_note = []
        for s in systems:
            log(f"idle connections: {s.label}, {n} connections")
            try:
                s.start(self.procs)
                before = s.rss_kb("VmRSS")
                n_here = n
                if isinstance(s, HAProxy) and haproxy_maxconn() < n + 100:
                    n_here = haproxy_maxconn() - 100
                    lines_note.append(f"HAProxy held {n_here} connections, not {n}: its maxconn must fit "
                                      f"RLIMIT_NOFILE/2 and this machine's hard limit is "
                                      f"{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}; compare KB per connection.")
                port = int(s.url.split(":")[2].split("/")[0])
                client = subprocess.Popen(
                    ["taskset", "-c", LOAD_CPUS, sys.executable, IDLE, "--port", str(port), "-n", str(n_here),
                     "--hold", str(hold + 120)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
                self.procs.live.append(client)
                client.bench_name = "idle-client"
                ready = client.stdout.readline().strip()
                first_failure = ""
                if not ready.startswith("READY"):
                    raise RuntimeError(f"idle client failed against {s.label}: {ready!r}")
                fields = dict(kv.split("=") for kv in ready.split()[1:])
                if int(fields["failed"]):
                    first_failure = client.stdout.readline().strip()
                time.sleep(IDLE_SETTLE)
                with_conns = s.rss_kb("VmRSS")
                peak = s.rss_kb("VmHWM")
                # Then keep them idle until `hold` to see whether the server
                # closes idle keep-alive connections (an idle timeout).
                time.sleep(max(0.0, hold - IDLE_SETTLE))
                client.stdin.close()
                still = client.stdout.readline().strip()
                client.wait(30)
                self.procs.live.remove(client)
                still_n = int(still.split("=")[1]) if still.startswith("STILL_OPEN") else -1
                opened = int(fields["open"])
                per = (with_conns - before) / opened if opened and with_conns and before else float("nan")
                results[s.key] = {"rss": with_conns, "peak": peak, "opened": opened, "still": still_n}
                lines.append(f"| {s.label} | {fmt_mb(before)} | {fmt_mb(with_conns)} | {fmt_mb(peak)} | {per:.1f} | "
                             f"{opened} | {still_n} | {fields['failed']} |")
                if first_failure:
                    lines.append(f"|  | first failure: {first_failure} | | | | | | |")
                if opened < 0.99 * n_here:
                    self.failures.append(f"idle connections: only {opened}/{n_here} opened against {s.label}")
            finally:
                if s.proc:
                    self.procs.stop(s.proc)
        lines.append("")
        lines += lines_note
        lines.append("")
        self.sections.append("\n".join(lines))
        return results

    def examples_phase(self):
        lines = ["### Reload-apply latency and rollback detection time", ""]
        if self.quick:
            lines.append("skipped in --quick (they build and run the proxy's own examples).")
            self.sections.append("\n".join(lines) + "\n")
            return {}
        found = {}
        for name in ("reload_latency", "rollback_detection"):
            path = os.path.join(ROOT, "proxy", "examples", f"{name}.rs")
            if not os.path.exists(path):
                lines.append(f"- `{name}`: not available yet (no proxy/examples/{name}.rs)")
                log(f"example {name}: not available yet")
                continue
            log(f"example {name}: cargo run --release --example {name}")
            try:
                out = subprocess.run(["cargo", "run", "--release", "--locked", "-q", "-p", "canary-proxy",
                                      "--example", name], cwd=ROOT, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                lines.append(f"- `{name}`: timed out after 600s")
                self.failures.append(f"example {name} timed out")
                continue
            results = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode != 0 or not results:
                tail = "\n".join((out.stdout + out.stderr).splitlines()[-10:])
                lines.append(f"- `{name}`: failed (exit {out.returncode}), no RESULT line:\n\n```\n{tail}\n```")
                self.failures.append(f"example {name} failed")
                continue
            found[name] = results
            lines.append(f"- `{name}`:")
            lines += [f"  - `{r}`" for r in results]
        lines.append("")
        self.sections.append("\n".join(lines))
        return found

    # -- report

    def summary_table(self, idle):
        """One table for the whole run: canary-proxy's figure in every row
        and measure, and its ratio to each peer's (below 1× is ahead, except
        req/s, where above 1× is). The detailed tables follow."""
        rows = list(self.summary)
        if idle:
            rows.append((f"{self.args.idle_conns} idle keep-alive connections",
                         {s_label: {"RSS MB": r["rss"] / 1024 if r.get("rss") else float("nan")}
                          for s_label, r in ((self.label_of(k), r) for k, r in idle.items())}))
        peers = ["HAProxy", "NGINX", "Traefik", "Caddy"]

        def num(x):
            return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}"
        out = ["### Summary: canary-proxy against each peer", "",
               "canary-proxy's own figure, then its ratio to each peer's (the peer's figure in brackets). "
               "Below 1× is ahead, except req/s, where above 1× is; – where the peer is not in that row.", "",
               "| row | measure | canary-proxy | " + " | ".join(f"× {p}" for p in peers) + " |",
               "|---|---|---:|" + "---:|" * len(peers)]
        for title, by_system in rows:
            cp = by_system.get("canary-proxy")
            if not cp:
                continue
            short = title.split(" (")[0].split(": ")[0] if len(title) > 60 else title
            for measure, value in cp.items():
                cells = []
                for p in peers:
                    v = by_system.get(p, {}).get(measure)
                    cells.append(f"{value / v:.2f}× ({num(v)})" if v and v == v and value == value else "–")
                out.append(f"| {short} | {measure} | {num(value)} | " + " | ".join(cells) + " |")
        out.append("")
        return "\n".join(out)

    @staticmethod
    def label_of(key):
        return {"canary-proxy": "canary-proxy", "haproxy": "HAProxy", "nginx": "NGINX", "traefik": "Traefik",
                "caddy": "Caddy"}.get(key, key)

    def goals(self, head, idle):
        if not head or "haproxy" not in head:
            return ""
        cp, hp = head["canary-proxy"], head["haproxy"]

        def mark(ok):
            return "met" if ok else "**not met**"

        rows = ["### Goals (headline figure)", "", "| goal | measured | verdict |", "|---|---|---|",
                f"| req/s ≥ 1.1 × HAProxy | {cp['rps']:.0f} vs {hp['rps']:.0f} = {cp['rps'] / hp['rps']:.2f}× | "
                f"{mark(cp['rps'] >= 1.1 * hp['rps'])} |",
                f"| p99 ≤ HAProxy's | {fmt_ms(cp['p99'])} ms vs {fmt_ms(hp['p99'])} ms | {mark(cp['p99'] <= hp['p99'])} |",
                f"| peak RSS < 30 MB at {CONNECTIONS} connections | {fmt_mb(cp['rss'])} MB | "
                f"{mark(cp['rss'] is not None and cp['rss'] < 30 * 1024)} |",
                f"| (not a goal) CPU per request | {fmt_cpu(cp['cpu_us'])} µs vs HAProxy's {fmt_cpu(hp['cpu_us'])} µs "
                f"= {cp['cpu_us'] / hp['cpu_us']:.2f}× | – |"]
        if idle and "canary-proxy" in idle:
            i = idle["canary-proxy"]
            rows.append(f"| RSS < 64 MB with {self.args.idle_conns} idle connections | {fmt_mb(i['rss'])} MB "
                        f"(peak {fmt_mb(i['peak'])} MB) | {mark(i['peak'] is not None and i['peak'] < 64 * 1024)} |")
        rows.append("")
        return "\n".join(rows)

    def versions(self):
        def first_line(cmd):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
                return (out.stdout + out.stderr).strip().splitlines()[0]
            except Exception:  # noqa: BLE001
                return "?"
        commit = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "proxy", "backend", "Cargo.lock"],
                               capture_output=True, text=True).stdout.strip()
        cpu = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        return {
            "commit": commit + (" (with uncommitted changes under proxy/ or backend/)" if dirty else ""),
            "cpu": f"{os.cpu_count()} × {cpu}",
            "kernel": os.uname().release,
            "haproxy": first_line(["haproxy", "-v"]).split(" - ")[0],
            "nginx": first_line(["nginx", "-v"]).replace("nginx version: ", ""),
            "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
            "h2load": first_line(["h2load", "--version"]),
            "traefik": tool_version("traefik"),
            "caddy": tool_version("caddy"),
            "build": self.args.profile,
        }

    def report(self, started, head, idle):
        v = self.versions()
        date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        mode = "quick smoke run (not a measurement)" if self.quick else "full run"
        if self.args.only:
            mode = {"h2": "HTTP/2 row only", "h2front": "HTTP/2 front-door row only",
                    "openloop": "headline and open-loop rows only",
                    "instructions": "instructions row only"}[self.args.only] + ", " + mode
        out = [f"# canary-proxy benchmark, {date} ({mode})", "",
               f"- commit {v['commit']}, canary-proxy and ping-backend built with the `{v['build']}` profile",
               f"- binaries: `{self.proxy_bin}`, `{self.backend_bin}`",
               f"- machine: {v['cpu']}, Linux {v['kernel']}",
               f"- {v['haproxy']}; {v['nginx']}; {v['traefik']}; {v['caddy']}; {v['wrk']}; {v['h2load']}",
               "- load average (1, 5, 15 min): " + "; ".join(f"{k} {l}" for k, l in self.loads),
               f"- upstreams: two `ping-backend` processes (stable v1, canary v2), one tokio worker each, on core "
               f"{UPSTREAM_CPUS}; split 90/10 over keep-alive; the split is counted from the `x-ping-version` "
               f"header of every answer wrk read; the static-upstreams row uses two NGINX `return 200` "
               f"upstreams instead (bench/peers/nginx-static.conf)",
               f"- took {time.monotonic() - started:.0f}s", ""]
        out.append(self.summary_table(idle))
        goals = self.goals(head, idle)
        if goals:
            out.append(goals)
        out += self.sections
        if self.failures:
            out += ["### Problems", ""] + [f"- {f}" for f in self.failures] + [""]
        return "\n".join(out)

    def run(self):
        started = time.monotonic()
        a = self.args
        head = idle = None
        try:
            self.start_upstreams()
            if a.compare or a.compare_routing:
                self.compare_phase(a.compare, a.rounds)
                if a.compare and not a.compare_routing and a.instructions_requests:
                    self.instructions_phase(a.instructions_requests, other_bin=a.compare)
            elif a.only == "instructions":
                self.instructions_phase(a.instructions_requests)
            elif a.only == "h2":
                self.h2_phase(a.h2_rounds)
                self.loads.append(("after HTTP/2 row", loadavg()))
            elif a.only == "h2front":
                self.h2front_phase(a.h2front_rounds)
                self.loads.append(("after HTTP/2 front-door row", loadavg()))
            elif a.only == "openloop":
                # its rates are fractions of HAProxy's maximum in the headline row
                head = self.throughput_phase(1, include_direct=True, rounds=a.rounds)
                self.loads.append(("after headline", loadavg()))
                self.openloop_phase(head, a.openloop_rounds)
                self.loads.append(("after open-loop row", loadavg()))
            else:
                head = self.throughput_phase(1, include_direct=True, rounds=a.rounds)
                self.loads.append(("after headline", loadavg()))
                self.openloop_phase(head, a.openloop_rounds)
                self.loads.append(("after open-loop row", loadavg()))
                if a.static_rounds:
                    self.static_phase(a.static_rounds)
                    self.loads.append(("after static upstreams", loadavg()))
                if a.instructions_requests:
                    self.instructions_phase(a.instructions_requests)
                if not a.quick:
                    self.throughput_phase(2, include_direct=False, rounds=a.rounds2)
                    self.loads.append(("after two-thread figure", loadavg()))
                self.tls_phase(a.tls_rounds)
                self.h2_phase(a.h2_rounds)
                self.loads.append(("after HTTP/2 row", loadavg()))
                self.h2front_phase(a.h2front_rounds)
                self.loads.append(("after HTTP/2 front-door row", loadavg()))
                idle = self.idle_phase(a.idle_conns, a.idle_hold)
                self.examples_phase()
        except Exception as e:  # noqa: BLE001 - reported, and the run fails
            self.failures.append(f"harness error: {e}")
            log(f"harness error: {e}")
        finally:
            self.procs.stop_all()
        return self.finish(started, head, idle, compare=bool(a.compare or a.compare_routing))

    def finish(self, started, head, idle, compare=False):
        a = self.args
        self.loads.append(("end", loadavg()))
        out = a.out
        if not out:
            day = datetime.date.today().isoformat()
            kind = "-compare" if compare else (f"-{a.only}" if a.only else "") + ("-quick" if a.quick else "")
            out = os.path.join(HERE, "results", f"{day}{kind}.md")
        chart = None
        if not compare and (self.chart_cpu or self.chart_openloop):
            # --quick draws it too, so the code cannot rot, but into the temp
            # dir: its numbers are not a measurement.
            chart = (os.path.join(self.workdir, "chart-quick.png") if a.quick
                     else os.path.splitext(out)[0] + ".png")
            try:
                self.write_chart(chart)
                if not os.path.getsize(chart):
                    raise RuntimeError("empty file")
                self.sections.append(f"### Chart\n\n![CPU per request and open-loop p99 per system]"
                                     f"({os.path.basename(chart)})\n" if not a.quick else
                                     f"### Chart\n\ndrawn to {chart} (--quick: not kept)\n")
            except Exception as e:  # noqa: BLE001 - reported, and the run fails
                self.failures.append(f"chart: {e}")
                chart = None
        text = "\n".join(self.sections) if compare else self.report(started, head, idle)
        print(text)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        log(f"results written to {os.path.relpath(out, ROOT)}")
        if chart and not a.quick:
            log(f"chart written to {os.path.relpath(chart, ROOT)}")
        if self.failures:
            log("FAILED: " + " | ".join(self.failures))
            log(f"logs of every process kept in {self.workdir}")
            return 1
        shutil.rmtree(self.workdir, ignore_errors=True)
        return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short smoke run (about a minute and a half): every row "
                    "once, briefly; checks the harness and the split, not speed")
    ap.add_argument("--proxy-bin", required=True)
    ap.add_argument("--backend-bin", required=True)
    ap.add_argument("--profile", default="release")
    ap.add_argument("--out", help="results file (default bench/results/<date>.md)")
    ap.add_argument("--duration", type=int, help="seconds per measured load")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--rounds", type=int, help="rounds of the headline figure (canary-proxy, HAProxy, NGINX, "
                    "Traefik, Caddy, direct; ping-backend upstreams)")
    ap.add_argument("--rounds2", type=int, help="rounds of the two-thread figure")
    ap.add_argument("--static-rounds", type=int, help="rounds of the headline row against static NGINX upstreams "
                    "(bench/peers/nginx-static.conf) instead of ping-backend; 0 skips it")
    ap.add_argument("--tls-rounds", type=int, help="rounds of the TLS row (canary-proxy, HAProxy, Traefik, Caddy)")
    ap.add_argument("--h2-rounds", type=int, help="rounds of the HTTP/2 (gRPC-shaped, h2load) row")
    ap.add_argument("--only", choices=("h2", "h2front", "openloop", "instructions"),
                    help="run one row alone: h2 = HTTP/2 end to end (gRPC-shaped, h2load); h2front = HTTP/2 on the "
                    "front door only (h2c and h2 over TLS, HTTP/1.1 upstream); openloop = open-loop latency at fixed "
                    "rates (oha), after the headline row its rates derive from; instructions = user-space "
                    "instructions per request under callgrind, which a noisy host does not move; writes "
                    "<date>-<row>.md")
    ap.add_argument("--instructions-requests", type=int,
                    help="requests counted under callgrind in the instructions row (also run by --compare BIN); "
                    "0 skips it")
    ap.add_argument("--openloop-rounds", type=int, help="rounds of the open-loop (oha) row, per rate")
    ap.add_argument("--h2front-rounds", type=int, help="rounds of each half of the HTTP/2 front-door row")
    ap.add_argument("--idle-conns", type=int)
    ap.add_argument("--idle-hold", type=float)
    ap.add_argument("--compare-threads", type=int, default=1, choices=(1, 2),
                    help="worker threads of every system in --compare (2: the second figure's setup)")
    ap.add_argument("--compare-routing", choices=("sticky", "mirror-0"),
                    help="only the headline setup: this build against itself with a routing table added "
                    "(sticky: [sticky] header, every request with a random x-user-id; mirror-0: [mirror] at "
                    "share 0), to measure what the table costs; writes <date>-compare.md")
    ap.add_argument("--compare-tls", action="store_true",
                    help="with --compare: both builds and HAProxy behind TLS listeners (the TLS row's setup), "
                    "for a change on the TLS path")
    ap.add_argument("--compare", metavar="BIN", help="only the headline setup: this build against another "
                    "canary-proxy binary (and HAProxy), to measure one change, then the instructions row for both; "
                    "writes <date>-compare.md")
    args = ap.parse_args()
    defaults = (dict(duration=2, warmup=1, rounds=2, rounds2=0, static_rounds=1, tls_rounds=1, h2_rounds=1,
                     idle_conns=1000, idle_hold=2.0)
                if args.quick else
                dict(duration=10, warmup=2, rounds=5, rounds2=3, static_rounds=5, tls_rounds=3, h2_rounds=3,
                     idle_conns=10000, idle_hold=12.0))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # the rows of issue 20 (open loop, HTTP/2 front door)
    more = (dict(openloop_rounds=1, h2front_rounds=1, instructions_requests=300) if args.quick else
            dict(openloop_rounds=3, h2front_rounds=3, instructions_requests=20000))
    for k, v in more.items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    # 10k idle connections need file descriptors in the proxies and client.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError):
            want = hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))

    bench = Bench(args)
    atexit.register(bench.procs.stop_all)

    def on_signal(signum, _frame):
        bench.procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    return bench.run()


if __name__ == "__main__":
    sys.exit(main())
