"""The Grafana dashboard (k8s/components/monitoring/dashboard.json).

Three layers, each closer to what an operator sees:

1. the JSON: the panels the docs promise (by title), each with a description
   of the question it answers, every query on the `$datasource` variable and,
   where the metric has a `version` label, on the `$version` variable; and
   the ConfigMap the Grafana sidecar loads it from, as rendered by kustomize;
2. every query parses: promtool has no bare expression parser, so each one is
   written as a recording rule and checked with `promtool check rules`;
3. every query returns data from a real Prometheus scraping a real proxy
   (`canary-proxy run` in front of two ping-backends, with a [rollback]
   table, under steady loopback traffic).

Grafana's variables are replaced as Grafana would for "All" over a minute:
`$version` by `.*` (the variable's allValue), `$__rate_interval` and
`$__interval` by `1m`.

promtool and prometheus come from the Debian package `prometheus` (installed
by scripts/check-k8s); a missing one fails the test with that name, it is
never skipped. The binaries are found as test_manifests.py finds them.
"""

from __future__ import annotations

import http.client
import json
import math
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from test_manifests import KUSTOMIZATIONS, K8S, binary, of_kind, render

DASHBOARD = K8S / "components" / "monitoring" / "dashboard.json"
CONFIGMAP = "canary-proxy-dashboard"
CONFIGMAP_KEY = "canary-proxy.json"
DATASOURCE_UID = "${datasource}"

# The panels docs/metrics.md ("Grafana dashboard") describes, by title.
PANELS = {
    "Requests per second",
    "Error ratio",
    "Latency p50 and p99",
    "Configured and effective weight",
    "Rollback evidence",
    "Rollbacks",
    "Progress state",
    "Progress step",
    "Routes reloads",
    "Last routes reload",
}
# Proxy-wide metrics: no `version` label, so a `$version` filter would empty them.
UNVERSIONED = {
    "canary_proxy_config_reloads_total",
    "canary_proxy_config_last_reload_successful",
}
SUBSTITUTIONS = {"$version": ".*", "$__rate_interval": "1m", "$__interval": "1m"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return dashboard()["panels"]


def queries() -> list[tuple[str, str]]:
    """(panel title / refId, expression) for every target of every panel."""
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in panels() for t in p["targets"]]


def promql(expr: str) -> str:
    """The expression as Grafana sends it for version "All" and a 1m interval."""
    for variable in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(variable, SUBSTITUTIONS[variable])
    assert "$" not in expr, f"a Grafana variable this test does not substitute is left in:\n{expr}"
    return expr


def require(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        pytest.fail(
            f"{tool} is not installed: install the Debian package `prometheus` "
            "(apt-get install prometheus), or run scripts/check-k8s, which does"
        )
    return found


# --- 1. the JSON and its ConfigMap ----------------------------------------------------


def test_dashboard_has_the_documented_panels():
    d = dashboard()
    assert d["uid"] and d["title"]
    assert d.get("schemaVersion") == 39, "schemaVersion: docs/metrics.md says 39"
    titles = [p["title"] for p in panels()]
    assert len(titles) == len(set(titles)), f"duplicate panel titles: {titles}"
    assert set(titles) == PANELS, (
        f"missing: {sorted(PANELS - set(titles))}; not described in the docs: {sorted(set(titles) - PANELS)}"
    )
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"


def test_every_panel_says_what_question_it_answers():
    for p in panels():
        assert p.get("description", "").strip(), f"panel {p['title']!r} has no description"
        assert "?" in p["description"], f"panel {p['title']!r}: the description should ask its question"


def test_variables_datasource_and_version():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    version = variables["version"]
    assert version["type"] == "query"
    assert version["datasource"]["uid"] == DATASOURCE_UID
    query = version["query"]["query"] if isinstance(version["query"], dict) else version["query"]
    assert query == "label_values(canary_proxy_requests_total, version)"
    assert version["multi"] and version["includeAll"]
    # What the queries test substitutes for "All".
    assert version["allValue"] == SUBSTITUTIONS["$version"]


def test_every_target_uses_the_datasource_and_version_variables():
    selector = re.compile(r"(canary_proxy_\w+)\s*(\{[^}]*\})?")
    for p in panels():
        assert p["datasource"]["uid"] == DATASOURCE_UID, f"panel {p['title']!r}"
        assert p["targets"], f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            where = f"{p['title']} / {t['refId']}"
            assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            found = selector.findall(t["expr"])
            assert found, f"{where}: reads no canary_proxy_ metric"
            for name, matchers in found:
                if name not in UNVERSIONED:
                    assert 'version=~"$version"' in matchers, f"{where}: {name} is not filtered by $version"


def test_rollback_evidence_draws_the_trip_point_and_half_of_it():
    (p,) = [p for p in panels() if p["title"] == "Rollback evidence"]
    defaults = p["fieldConfig"]["defaults"]
    assert "line" in defaults["custom"]["thresholdsStyle"]["mode"]
    steps = {s["value"] for s in defaults["thresholds"]["steps"]}
    assert {0.5, 1} <= steps, f"threshold steps {steps}"


def test_the_dashboard_configmap_is_rendered_for_the_grafana_sidecar():
    rendered = []
    for path in KUSTOMIZATIONS:
        found = [d for d in of_kind(list(render(path)), "ConfigMap") if d["metadata"]["name"] == CONFIGMAP]
        rendered += found
        for cm in found:
            assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", path
            assert json.loads(cm["data"][CONFIGMAP_KEY]) == dashboard(), f"{path}: not dashboard.json"
    assert rendered, "no kustomization renders the dashboard ConfigMap (include components/monitoring)"


# --- 2. every query parses ------------------------------------------------------------------


def test_every_query_parses(tmp_path):
    promtool = require("promtool")
    rules = [{"record": f"dashboard:query_{i}", "expr": promql(expr)} for i, (_, expr) in enumerate(queries())]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        numbered = "\n".join(f"dashboard:query_{i}: {where}" for i, (where, _) in enumerate(queries()))
        pytest.fail(f"promtool check rules rejects a dashboard query:\n{out.stdout}{out.stderr}\n{numbered}")


# --- 3. every query returns data ---------------------------------------------------------------

ROUTES = """\
[versions.stable]
upstream = "http://{stable}"
weight = 50

[versions.canary]
upstream = "http://{canary}"
weight = 50

[rollback]
target = "stable"

# For the progress panels: a run that stays on its first step for the test.
[progress]
version = "canary"
steps = [50, 100]
step_time = "1h"
"""
# Some canary 5xx for the error ratio, well below the rollback line (5%).
CANARY_ERROR_RATE = "0.02"
DEADLINE = 60.0  # for each wait below, in seconds


class Process:
    """A child process whose stdout lines are read in the background."""

    def __init__(self, args: list[str], log: Path):
        self.args = args
        self.log = log.open("w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def listening(self) -> dict:
        """The {"listening": ...} line both binaries print once bound."""
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line.startswith('{"listening"'):
                return json.loads(line)["listening"]
        pytest.fail(f"{self.args[0]} did not say where it listens:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log.name + ":\n" + Path(self.log.name).read_text()[-3000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


class Load:
    """Keep-alive GET /ping to the proxy from one thread until stopped, bounded."""

    def __init__(self, addr: str, max_requests: int = 200_000, max_seconds: float = 120):
        self.host, port = addr.rsplit(":", 1)
        self.port = int(port)
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.stop_event = threading.Event()
        self.sent = 0
        self.statuses: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        end = time.monotonic() + self.max_seconds
        conn = None
        while not self.stop_event.is_set() and self.sent < self.max_requests and time.monotonic() < end:
            try:
                conn = conn or http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/ping")
                resp = conn.getresponse()
                resp.read()
                self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
            except (OSError, http.client.HTTPException):
                conn = None
            self.sent += 1
            time.sleep(0.002)  # a few hundred per second: steady, not a benchmark

    def stop(self):
        self.stop_event.set()
        self.thread.join(timeout=10)


def free_port() -> int:
    # Prometheus takes no port 0; the same small race as proxy/tests/metrics.rs.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def instant(prom: str, expr: str) -> list[dict] | None:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
    except (OSError, ValueError):
        return None
    return body["data"]["result"] if body.get("status") == "success" else None


def has_data(result: list[dict] | None) -> bool:
    """At least one series with a number (NaN, an empty histogram, draws nothing)."""
    return bool(result) and any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_query_returns_data_from_a_real_prometheus(tmp_path):
    prometheus = require("prometheus")
    ping = str(binary("ping-backend", "PING_BACKEND_BIN"))
    proxy_bin = str(binary("canary-proxy", "CANARY_PROXY_BIN"))
    started: list[Process] = []
    load = None
    try:
        def start(name: str, args: list[str]) -> Process:
            p = Process(args, tmp_path / f"{name}.log")
            started.append(p)
            return p

        common = ["--listen", "127.0.0.1:0", "--drain-delay", "0s", "--shutdown-timeout", "1s"]
        stable = start("stable", [ping, *common, "--version", "v1"]).listening()["addr"]
        canary = start("canary", [ping, *common, "--version", "v2", "--error-rate", CANARY_ERROR_RATE]).listening()["addr"]
        routes = tmp_path / "routes.toml"
        routes.write_text(ROUTES.format(stable=stable, canary=canary))
        proxy = start("proxy", [proxy_bin, "run", *common, "--admin-listen", "127.0.0.1:0", "--routes", str(routes)])
        addrs = proxy.listening()

        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "canary-proxy", "static_configs": [{"targets": [addrs["admin"]]}]}],
        }))
        prom = f"127.0.0.1:{free_port()}"
        server = start("prometheus", [
            prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={prom}", "--log.level=warn",
        ])

        load = Load(addrs["traffic"])
        # rate() over 1m needs two samples; wait for five scrapes with traffic.
        end = time.monotonic() + DEADLINE
        while True:
            r = instant(prom, 'count_over_time(up{job="canary-proxy"}[1m]) and on() (up == 1)')
            if r and float(r[0]["value"][1]) >= 5:
                break
            assert server.proc.poll() is None, f"prometheus exited:\n{server.log_text()}"
            assert time.monotonic() < end, f"Prometheus did not scrape the proxy 5 times in {DEADLINE}s:\n{server.log_text()}"
            time.sleep(0.5)

        # Every query, polled until it has data or a short deadline passes.
        pending = {where: promql(expr) for where, expr in queries()}
        end = time.monotonic() + 15
        while pending and time.monotonic() < end:
            for where, expr in list(pending.items()):
                if has_data(instant(prom, expr)):
                    del pending[where]
            time.sleep(1)
        load.stop()
        assert load.statuses.get(200), f"no request through the proxy succeeded: {load.statuses}\n{proxy.log_text()}"
        assert not pending, (
            f"{len(pending)} of {len(queries())} dashboard queries returned no data "
            f"from a real Prometheus scraping the proxy (requests sent: {load.statuses}):\n"
            + "\n".join(f"- {where}: {expr}" for where, expr in pending.items())
        )
    finally:
        if load:
            load.stop()
        for p in reversed(started):
            p.stop()
