"""Invariants of the rendered Kubernetes manifests that no schema catches.

Each test reads the output of `kubectl kustomize` for every kustomization we
ship (the product, k8s/, and every overlay), so what is checked is what
`kubectl apply -k` would send. Run by scripts/check-k8s, which builds the
binaries first; on its own:

    cargo build -p canary-proxy -p ping-backend
    target/ci-venv/bin/pytest k8s/tests

The binaries are found through $CANARY_PROXY_BIN / $PING_BACKEND_BIN, else in
target/debug, else target/release. The facts about them that the manifests
must agree with (flag env vars, defaults, endpoints) are pinned below and
checked against each binary's own --help where it states them.
"""

from __future__ import annotations

import copy
import functools
import ipaddress
import os
import re
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
EXAMPLES = K8S / "examples"
NAMESPACE = "canary-proxy"

# What the binaries are, as pinned for this repo (docs/kubernetes.md).
PING = {
    "binary": "ping-backend",
    "listen_env": "PING_LISTEN",
    "listen_default": "0.0.0.0:8080",
    "drain_env": "PING_DRAIN_DELAY",
    "drain_default": "5s",
    "shutdown_env": "PING_SHUTDOWN_TIMEOUT",
    "shutdown_default": "25s",
}
PROXY = {
    "binary": "canary-proxy",
    "listen_env": "CANARY_PROXY_LISTEN",
    "listen_default": "0.0.0.0:8080",
    "admin_env": "CANARY_PROXY_ADMIN_LISTEN",
    "admin_default": "0.0.0.0:9090",
    "routes_env": "CANARY_PROXY_ROUTES",
    "routes_default": "/etc/canary-proxy/routes.toml",
    "drain_env": "CANARY_PROXY_DRAIN_DELAY",
    "drain_default": "5s",
    "shutdown_env": "CANARY_PROXY_SHUTDOWN_TIMEOUT",
    "shutdown_default": "25s",
}
READY_PATH = "/readyz"
LIVE_PATH = "/healthz"
ROUTES_CONFIGMAP = "canary-proxy-routes"
ROUTES_KEY = "routes.toml"
# The version the PrometheusRule's "rollback target" alert is about.
ALERT_ROLLBACK_TARGET = "stable"


# --- rendering ----------------------------------------------------------------


def kustomizations() -> list[Path]:
    """Every kustomization we ship that renders on its own: k8s/ and overlays.

    k8s/base is rendered through k8s/; components only through an overlay
    (test_every_component_is_rendered checks that each one is)."""
    found = [K8S]
    overlays = K8S / "overlays"
    if overlays.is_dir():
        found += sorted(p.parent for p in overlays.glob("*/kustomization.yaml"))
    return found


KUSTOMIZATIONS = kustomizations()
IDS = [str(p.relative_to(REPO)) for p in KUSTOMIZATIONS]


@functools.cache
def render(path: Path) -> tuple[dict, ...]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


@pytest.fixture(params=KUSTOMIZATIONS, ids=IDS)
def docs(request) -> list[dict]:
    # Deep copies, so a test that edits a resource cannot leak into another.
    return copy.deepcopy(list(render(request.param)))


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return of_kind(docs, "Deployment")


def pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels / matchExpressions) or a Service's plain map."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels, expressions = selector.get("matchLabels") or {}, selector.get("matchExpressions", [])
    else:
        match_labels, expressions = selector, []
    if any(labels.get(key) != value for key, value in match_labels.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def selected_workloads(docs: list[dict], selector: dict) -> list[dict]:
    return [w for w in workloads(docs) if selects(selector, pod_labels(w))]


def container_of(workload: dict, binary: str) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if image_name(c["image"]) == binary]
    assert len(found) == 1, f"{workload['metadata']['name']}: expected one {binary} container"
    return found[0]


def image_name(image: str) -> str:
    """registry/path/name:tag@digest -> name"""
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def image_tag(image: str) -> str | None:
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def env_of(container: dict) -> dict[str, str]:
    env = {}
    for item in container.get("env", []):
        assert "valueFrom" not in item, f"{item['name']}: the checks need literal values"
        env[item["name"]] = item.get("value", "")
    return env


def setting(container: dict, facts: dict, what: str) -> str:
    """A flag's value as the container sets it (env var), else the binary's default."""
    return env_of(container).get(facts[f"{what}_env"], facts[f"{what}_default"])


def listen_port(addr: str) -> int:
    host, _, port = addr.rpartition(":")
    assert host and port.isdigit(), f"{addr!r} is not HOST:PORT"
    return int(port)


def listens_on_all_interfaces(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    return ipaddress.ip_address(host).is_unspecified


def resolve_port(container: dict, port) -> int:
    """A probe or Service targetPort (number or name) -> the container port number."""
    if isinstance(port, int):
        return port
    named = [p for p in container.get("ports", []) if p.get("name") == port]
    assert len(named) == 1, f"port name {port!r} is not declared on container {container['name']}"
    return named[0]["containerPort"]


DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(duration: str) -> float:
    """humantime-style durations as the binaries take them: 250ms, 5s, 1m30s."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration.replace(" ", ""), (
        f"cannot read duration {duration!r}"
    )
    return sum(float(n) * DURATION_UNITS[u] for n, u in parts)


# --- the binaries ---------------------------------------------------------------


def binary(name: str, env_var: str) -> Path:
    given = os.environ.get(env_var)
    candidates = [Path(given)] if given else [
        REPO / "target" / "debug" / name,
        REPO / "target" / "release" / name,
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(
        f"{name} binary not found (looked at {', '.join(map(str, candidates))}); "
        f"build it with `cargo build -p {name}` or set {env_var}"
    )


@functools.cache
def help_text(name: str, env_var: str, *args: str) -> str:
    # A clean environment: clap shows `[env: NAME=value]` when the var is set.
    out = subprocess.run(
        [str(binary(name, env_var)), *args, "--help"],
        capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")}, check=False,
    )
    assert out.returncode == 0, f"{name} {' '.join(args)} --help failed:\n{out.stderr}"
    return out.stdout


def proxy_check(routes_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / ROUTES_KEY
    path.write_text(routes_text)
    proxy = binary("canary-proxy", "CANARY_PROXY_BIN")
    out = subprocess.run([str(proxy), "check", str(path)], capture_output=True, text=True, check=False)
    if out.returncode not in (0, 1):
        pytest.fail(
            f"`canary-proxy check {path}` exited {out.returncode}, expected 0 (valid) or 1 "
            f"(invalid); does this build have the `check` subcommand?\n{out.stdout}{out.stderr}"
        )
    return out


# --- the routes ConfigMap ------------------------------------------------------------


def routes_text(docs: list[dict]) -> str:
    cm = one(docs, "ConfigMap", ROUTES_CONFIGMAP)
    assert set(cm.get("data", {})) == {ROUTES_KEY}, f"{ROUTES_CONFIGMAP} must hold only {ROUTES_KEY}"
    return cm["data"][ROUTES_KEY]


def proxy_workload(docs: list[dict]) -> dict:
    found = [w for w in workloads(docs) if any(
        image_name(c["image"]) == "canary-proxy" for c in w["spec"]["template"]["spec"]["containers"])]
    assert len(found) == 1, "expected exactly one canary-proxy Deployment"
    return found[0]


def ping_workloads(docs: list[dict]) -> list[dict]:
    return [w for w in workloads(docs) if any(
        image_name(c["image"]) == "ping-backend" for c in w["spec"]["template"]["spec"]["containers"])]


def service_for_host(docs: list[dict], host: str, namespace: str) -> dict:
    """A Service by the DNS name a pod in `namespace` would use for it."""
    parts = host.split(".")
    name = parts[0]
    ns = namespace
    if len(parts) >= 2:
        ns = parts[1]
        assert parts[2:] in ([], ["svc"], ["svc", "cluster", "local"]), (
            f"upstream host {host!r} is not a Service DNS name"
        )
    matches = [s for s in of_kind(docs, "Service")
               if s["metadata"]["name"] == name and s["metadata"].get("namespace") == ns]
    assert matches, f"upstream host {host!r} names no Service in namespace {ns}"
    return matches[0]


def is_headless(service: dict) -> bool:
    return service["spec"].get("clusterIP") == "None"


# How stale the proxy's view of a headless Service can be: the TTL of its DNS
# records. CoreDNS's kubernetes plugin answers with 5s unless told otherwise,
# but the Corefile kubeadm (and so minikube) ships sets `ttl 30` (kubernetes
# PR #76238, to match kube-dns) and `cache 30`; the proxy honours the TTL up
# to 30s. Either way, a pod can stay in the proxy's set this long after it
# leaves the Service.
DNS_RECORD_TTL_SECONDS = 30


def check_upstreams(docs: list[dict], routes: dict) -> None:
    """Every upstream is a Service of ours, on a port it has, reaching pods
    that listen there; the versions' Services select disjoint pods.

    The Service's kind must fit the version's `discovery`:

    - `discovery = "dns"`: a headless Service (clusterIP None). The proxy
      resolves its name to every ready pod's address and balances each
      request over them, connecting to POD_IP:<upstream port> with no
      kube-proxy in between, so that port must be the one ping-backend
      listens on (a Service's port -> targetPort mapping does not apply).
      A ClusterIP Service would resolve to its one virtual IP: "discovery"
      would find one endpoint, and kube-proxy would pick the pod per
      connection again.
    - no `discovery`: a ClusterIP Service. A headless name there would be
      resolved by the connection pool like any host name, so each new
      connection goes to whichever pod DNS round robin lists first, and
      keep-alive connections pin it: worse than kube-proxy's pick, with
      no balancing and no notice of pods that leave.
    """
    proxy_ns = proxy_workload(docs)["metadata"].get("namespace")
    seen_workloads: dict[str, str] = {}
    for version, spec in routes["versions"].items():
        url = urlsplit(spec["upstream"])
        assert url.scheme == "http", f"versions.{version}.upstream: the ping pods speak plain http"
        assert url.port is not None, f"versions.{version}.upstream: give the Service port explicitly"
        service = service_for_host(docs, url.hostname, proxy_ns)
        svc_name = service["metadata"]["name"]
        discovery = spec.get("discovery")
        assert discovery in (None, "dns"), f"versions.{version}.discovery = {discovery!r}"
        if discovery == "dns":
            assert is_headless(service), (
                f"versions.{version} has discovery = \"dns\" but its upstream names the "
                f"ClusterIP Service {svc_name}, which resolves to one virtual IP; name the "
                f"version's headless Service (clusterIP: None)"
            )
        else:
            assert not is_headless(service), (
                f"versions.{version}.upstream names the headless Service {svc_name} without "
                f"discovery = \"dns\": each connection would go to one pod by DNS round robin; "
                f"add discovery = \"dns\" or name the ClusterIP Service"
            )
        ports = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        assert ports, (
            f"versions.{version}.upstream: Service {svc_name} has no port {url.port} "
            f"(it has {[p['port'] for p in service['spec']['ports']]})"
        )
        backends = selected_workloads(docs, service["spec"]["selector"])
        assert len(backends) == 1, (
            f"Service {svc_name} (version {version}) must select exactly one Deployment's pods, "
            f"selects {[w['metadata']['name'] for w in backends]}"
        )
        workload = backends[0]
        container = container_of(workload, "ping-backend")
        target = resolve_port(container, ports[0].get("targetPort", ports[0]["port"]))
        listen = setting(container, PING, "listen")
        assert target == listen_port(listen), (
            f"Service {svc_name} sends port {url.port} to container port {target}, "
            f"but ping-backend listens on {listen}"
        )
        if discovery == "dns":
            assert url.port == listen_port(listen), (
                f"versions.{version}.upstream: with discovery the proxy connects to each pod on "
                f"port {url.port}, but ping-backend listens on {listen}"
            )
            # The Service publishes the Deployment's pods and only those:
            # its selector is the Deployment's own, and selects no other.
            assert service["spec"]["selector"] == workload["spec"]["selector"].get("matchLabels"), (
                f"headless Service {svc_name} (version {version}) must select the pods of "
                f"Deployment {workload['metadata']['name']} by that Deployment's selector"
            )
            assert not service["spec"].get("publishNotReadyAddresses", False), (
                f"headless Service {svc_name} publishes pods that are not ready; the proxy "
                f"would send requests to starting and draining pods"
            )
        assert listens_on_all_interfaces(listen), f"{workload['metadata']['name']}: {listen} is not reachable from other pods"
        other = seen_workloads.setdefault(workload["metadata"]["name"], version)
        assert other == version, f"versions {other} and {version} reach the same Deployment"


# --- tests: rendering ------------------------------------------------------------------


def test_every_component_is_rendered():
    used = set()
    for path in KUSTOMIZATIONS + [K8S / "base"]:
        k = yaml.safe_load((path / "kustomization.yaml").read_text())
        used |= {(path / c).resolve() for c in k.get("components", [])}
    components = {p.parent.resolve() for p in (K8S / "components").glob("*/kustomization.yaml")}
    assert components <= used, f"components no overlay renders: {sorted(map(str, components - used))}"


def test_product_resources(docs):
    stable = one(docs, "Deployment", "ping-stable")
    canary = one(docs, "Deployment", "ping-canary")
    proxy = one(docs, "Deployment", "canary-proxy")
    for workload, replicas, tag in ((stable, 2, "v1"), (canary, 1, "v2")):
        name = workload["metadata"]["name"]
        assert workload["spec"]["replicas"] == replicas, name
        container = container_of(workload, "ping-backend")
        assert image_tag(container["image"]) == tag, f"{name}: image tag"
        assert env_of(container).get("PING_VERSION") == tag, f"{name}: PING_VERSION"
        assert one(docs, "Service", name)["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert proxy["spec"]["replicas"] == 2
    assert one(docs, "Service", "canary-proxy")["spec"]["type"] == "LoadBalancer"
    assert one(docs, "Service", "canary-proxy-admin")["spec"].get("type", "ClusterIP") == "ClusterIP"
    for d in docs:
        if d["kind"] not in ("Namespace",):
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']}"


# --- tests: routes -----------------------------------------------------------------------


def test_routes_pass_the_proxys_validation(docs, tmp_path):
    out = proxy_check(routes_text(docs), tmp_path)
    assert out.returncode == 0, f"canary-proxy check rejects the shipped routes:\n{out.stdout}{out.stderr}"


def test_proxy_check_rejects_a_broken_routes_file(tmp_path):
    # Proof that the check above is a real check and not a no-op.
    broken = routes_text(list(render(K8S))).replace("weight = 90", "wieght = 90")
    out = proxy_check(broken, tmp_path)
    assert out.returncode == 1, f"canary-proxy check accepted a misspelt key:\n{out.stdout}{out.stderr}"


def test_routes_upstreams_are_our_services(docs):
    check_upstreams(docs, tomllib.loads(routes_text(docs)))


def test_upstream_check_tells_headless_from_clusterip():
    """Proof that check_upstreams holds each version's Service kind to its
    `discovery`, whatever the shipped routes use: a discovery version on a
    ClusterIP Service, and a plain version on a headless one, both fail."""
    docs = copy.deepcopy(list(render(K8S)))

    def routes(stable: dict) -> dict:
        return {"versions": {
            "stable": stable,
            "canary": {"upstream": "http://ping-canary:8080"},
        }}

    check_upstreams(docs, routes({"upstream": "http://ping-stable-headless:8080", "discovery": "dns"}))
    check_upstreams(docs, routes({"upstream": "http://ping-stable:8080"}))
    with pytest.raises(AssertionError, match="names the ClusterIP Service ping-stable"):
        check_upstreams(docs, routes({"upstream": "http://ping-stable:8080", "discovery": "dns"}))
    with pytest.raises(AssertionError, match="names the headless Service ping-stable-headless"):
        check_upstreams(docs, routes({"upstream": "http://ping-stable-headless:8080"}))


def test_rollback_target_is_the_version_the_alerts_watch(docs):
    routes = tomllib.loads(routes_text(docs))
    target = routes.get("rollback", {}).get("target")
    assert target == ALERT_ROLLBACK_TARGET, (
        f"rollback.target is {target!r}, but the PrometheusRule's rollback-target alert "
        f"watches version={ALERT_ROLLBACK_TARGET!r}"
    )
    assert target in routes["versions"]
    for rule in of_kind(docs, "PrometheusRule"):
        exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
        assert f'version="{ALERT_ROLLBACK_TARGET}"' in exprs
        assert f'version!="{ALERT_ROLLBACK_TARGET}"' in exprs


# --- tests: wiring ------------------------------------------------------------------------


def test_selectors_match_pod_labels(docs):
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        assert selects(workload["spec"]["selector"], pod_labels(workload)), f"Deployment {name}"
        for others in workloads(docs):
            if others is not workload:
                assert not selects(workload["spec"]["selector"], pod_labels(others)), (
                    f"Deployment {name}'s selector also matches {others['metadata']['name']}'s pods"
                )
        for constraint in workload["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert selected_workloads(docs, constraint["labelSelector"]) == [workload], (
                f"{name}: topologySpreadConstraints select other pods"
            )
    for service in of_kind(docs, "Service"):
        assert selected_workloads(docs, service["spec"]["selector"]), (
            f"Service {service['metadata']['name']} selects no pods"
        )
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert len(selected_workloads(docs, pdb["spec"]["selector"])) == 1, (
            f"PodDisruptionBudget {pdb['metadata']['name']} must cover exactly one Deployment"
        )
    proxy = proxy_workload(docs)
    assert any(selected_workloads(docs, p["spec"]["selector"]) == [proxy]
               for p in of_kind(docs, "PodDisruptionBudget")), "the proxy has no PodDisruptionBudget"


def test_each_ping_deployment_has_a_clusterip_and_a_headless_service(docs):
    """NAME (ClusterIP: kube-proxy picks a pod per connection) for routes
    without discovery and for anything else that calls the ping pods;
    NAME-headless (one DNS record per ready pod) for `discovery = "dns"`.
    Both publish the same pods on the same ports."""
    for workload in ping_workloads(docs):
        name = workload["metadata"]["name"]
        clusterip = one(docs, "Service", name)
        headless = one(docs, "Service", f"{name}-headless")
        assert not is_headless(clusterip) and clusterip["spec"].get("type", "ClusterIP") == "ClusterIP", name
        assert is_headless(headless), f"Service {name}-headless: set clusterIP: None"
        assert headless["spec"].get("type", "ClusterIP") == "ClusterIP", f"Service {name}-headless"
        # Only ready pods: readiness (503 from SIGTERM on) is what takes a
        # pod out of the proxy's set.
        assert headless["spec"].get("publishNotReadyAddresses") is False, f"Service {name}-headless"
        assert headless["spec"]["selector"] == clusterip["spec"]["selector"], f"Service {name}-headless: selector"
        assert headless["spec"]["ports"] == clusterip["spec"]["ports"], f"Service {name}-headless: ports"
        assert selected_workloads(docs, headless["spec"]["selector"]) == [workload], f"Service {name}-headless"


def test_ping_pods_drain_until_dns_forgets_them(docs):
    """A pod behind a headless Service leaves the proxy's endpoints only
    when the proxy next resolves the name: after its readiness probe fails
    (the pod leaves the Service) and the DNS answer that still listed it
    expires. It must keep serving through that, or requests sent to it in
    the meantime meet a closed port."""
    published = [w for s in of_kind(docs, "Service") if is_headless(s)
                 for w in selected_workloads(docs, s["spec"]["selector"])]
    assert published, "no headless Service publishes any pods"
    for workload in published:
        container = container_of(workload, "ping-backend")
        probe = container["readinessProbe"]
        noticed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3) + probe.get("timeoutSeconds", 1)
        need = noticed + DNS_RECORD_TTL_SECONDS
        drain = seconds(setting(container, PING, "drain"))
        assert drain >= need, (
            f"{workload['metadata']['name']}: {PING['drain_env']} {drain:g}s < readiness "
            f"failure ({noticed}s) + DNS record TTL ({DNS_RECORD_TTL_SECONDS}s)"
        )


def test_service_target_ports_exist(docs):
    for service in of_kind(docs, "Service"):
        for workload in selected_workloads(docs, service["spec"]["selector"]):
            containers = workload["spec"]["template"]["spec"]["containers"]
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert any(p.get("name") == target or p["containerPort"] == target
                           for c in containers for p in c.get("ports", [])), (
                    f"Service {service['metadata']['name']} targets port {target!r}, "
                    f"which no container of {workload['metadata']['name']} declares"
                )


def test_network_policy_lets_only_the_proxy_reach_ping_pods(docs):
    proxy = proxy_workload(docs)
    pings = ping_workloads(docs)
    covering = [p for p in of_kind(docs, "NetworkPolicy")
                if all(selects(p["spec"]["podSelector"], pod_labels(w)) for w in pings)]
    assert covering, "no NetworkPolicy covers the ping pods"
    for policy in covering:
        assert "Ingress" in policy["spec"]["policyTypes"]
        assert not selects(policy["spec"]["podSelector"], pod_labels(proxy))
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            assert peers, f"{policy['metadata']['name']}: an ingress rule without `from` admits everyone"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: only pod peers"
                assert selected_workloads(docs, peer["podSelector"]) == [proxy], (
                    f"{policy['metadata']['name']}: admits pods other than the proxy's"
                )
            for port in rule.get("ports", []):
                for w in pings:
                    c = container_of(w, "ping-backend")
                    assert resolve_port(c, port["port"]) == listen_port(setting(c, PING, "listen"))


# Where a pod's DNS queries go: the cluster DNS (CoreDNS keeps the kube-dns
# name and label for compatibility), on port 53 over UDP and TCP.
CLUSTER_DNS = {
    "namespace_labels": {"kubernetes.io/metadata.name": "kube-system"},
    "pod_labels": {"k8s-app": "kube-dns"},
    "ports": [(53, "dns", "UDP"), (53, "dns-tcp", "TCP")],
}


def egress_allowed(docs: list[dict], source: dict, namespace_labels: dict, labels: dict,
                   port: int, port_name: str, protocol: str) -> bool:
    """Whether NetworkPolicy lets `source`'s pods open a connection to a pod
    with `labels` in a namespace with `namespace_labels`, on port/protocol:
    allowed unless a policy with Egress selects the source pods, and then
    only if a rule of one of them admits the peer and the port."""
    src_ns = source["metadata"].get("namespace")
    policies = [p for p in of_kind(docs, "NetworkPolicy")
                if p["metadata"].get("namespace") == src_ns
                and "Egress" in p["spec"].get("policyTypes", [])
                and selects(p["spec"]["podSelector"], pod_labels(source))]
    if not policies:
        return True

    def peer_matches(peer: dict) -> bool:
        if "ipBlock" in peer:
            return False  # pod IPs are not known offline; say it with a selector
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], namespace_labels):
                return False
        elif namespace_labels.get("kubernetes.io/metadata.name") != src_ns:
            return False  # a bare podSelector means the policy's own namespace
        return selects(peer.get("podSelector", {}), labels)

    def port_matches(rule_port: dict) -> bool:
        if rule_port.get("protocol", "TCP") != protocol:
            return False
        wanted = rule_port.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            return wanted == port_name
        return wanted <= port <= rule_port.get("endPort", wanted)

    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            peers, ports = rule.get("to"), rule.get("ports")
            if (not peers or any(peer_matches(p) for p in peers)) and \
                    (not ports or any(port_matches(p) for p in ports)):
                return True
    return False


def test_network_policy_lets_the_proxy_resolve_and_reach_ping_pods(docs):
    """With `discovery = "dns"` the proxy looks names up itself, every few
    seconds, and connects to pod IPs on the pods' own port rather than to a
    ClusterIP. NetworkPolicy sees pod IPs either way (kube-proxy translates
    before it), so what the proxy needs is egress to the cluster DNS on 53
    (UDP and TCP: large answers fall back to TCP) and to the ping pods by
    their labels on their listen port. Today no policy restricts the proxy's
    egress; this keeps it so should one ever be added."""
    proxy = proxy_workload(docs)
    for protocol_port, port_name, protocol in CLUSTER_DNS["ports"]:
        assert egress_allowed(docs, proxy, CLUSTER_DNS["namespace_labels"], CLUSTER_DNS["pod_labels"],
                              protocol_port, port_name, protocol), (
            f"NetworkPolicy blocks the proxy's DNS queries ({protocol} 53 to kube-dns in kube-system)"
        )
    ns_labels = {"kubernetes.io/metadata.name": proxy["metadata"].get("namespace")}
    for workload in ping_workloads(docs):
        container = container_of(workload, "ping-backend")
        port = listen_port(setting(container, PING, "listen"))
        names = [p.get("name", "") for p in container["ports"] if p["containerPort"] == port]
        assert egress_allowed(docs, proxy, ns_labels, pod_labels(workload), port,
                              names[0] if names else "", "TCP"), (
            f"NetworkPolicy blocks the proxy's connections to {workload['metadata']['name']}'s "
            f"pods on port {port}"
        )


# --- tests: the binaries' flags ----------------------------------------------------------------


def test_manifest_env_vars_are_flags_of_the_binaries(docs):
    for workload in workloads(docs):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            name = image_name(container["image"])
            if name == "canary-proxy":
                args = container.get("args", [])
                assert args[:1] == ["run"], f"{workload['metadata']['name']}: canary-proxy needs `run`"
                text = help_text(name, "CANARY_PROXY_BIN", "run")
            else:
                assert name == "ping-backend", f"unexpected image {container['image']}"
                text = help_text(name, "PING_BACKEND_BIN")
            for var in env_of(container):
                assert f"[env: {var}=" in text, (
                    f"{workload['metadata']['name']}: env {var} is not a flag of `{name} --help`"
                )


def test_pinned_flag_defaults_match_the_binaries():
    # The checks below fall back to these defaults where a manifest sets nothing.
    for facts, env_var, args in ((PING, "PING_BACKEND_BIN", ()), (PROXY, "CANARY_PROXY_BIN", ("run",))):
        text = help_text(facts["binary"], env_var, *args)
        for key, value in facts.items():
            if key.endswith("_env"):
                default = facts[key.replace("_env", "_default")]
                line = next((l for l in text.splitlines() if f"[env: {value}=" in l), None)
                assert line is not None, f"{facts['binary']}: no flag for {value}"
                assert f"[default: {default}]" in line, f"{facts['binary']} {value}: default is not {default}"


def test_probes_match_the_binaries(docs):
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if image_name(container["image"]) == "canary-proxy":
                probe_addr = setting(container, PROXY, "admin")
                traffic_addr = setting(container, PROXY, "listen")
            else:
                probe_addr = traffic_addr = setting(container, PING, "listen")
            assert listens_on_all_interfaces(probe_addr), f"{name}: the kubelet cannot reach {probe_addr}"
            for kind, path in (("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)):
                probe = container.get(kind)
                assert probe and "httpGet" in probe, f"{name}: {kind} must be an httpGet probe"
                assert probe["httpGet"]["path"] == path, f"{name}: {kind} path"
                port = resolve_port(container, probe["httpGet"]["port"])
                assert port == listen_port(probe_addr), (
                    f"{name}: {kind} on port {port}, but the endpoint listens on {probe_addr}"
                )
            declared = {p["containerPort"] for p in container["ports"]}
            assert {listen_port(traffic_addr), listen_port(probe_addr)} == declared, (
                f"{name}: containerPorts {declared} differ from the listen addresses"
            )


def test_routes_configmap_is_mounted_as_a_directory(docs):
    proxy = proxy_workload(docs)
    pod = proxy["spec"]["template"]["spec"]
    container = container_of(proxy, "canary-proxy")
    routes_path = setting(container, PROXY, "routes")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = [m for m in container["volumeMounts"]
              if volumes[m["name"]].get("configMap", {}).get("name") == ROUTES_CONFIGMAP]
    assert len(mounts) == 1, f"mount the ConfigMap {ROUTES_CONFIGMAP} once"
    mount = mounts[0]
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        "the routes ConfigMap is mounted with subPath; subPath mounts never update"
    )
    assert mount.get("readOnly") is True
    assert routes_path == f"{mount['mountPath'].rstrip('/')}/{ROUTES_KEY}", (
        f"the proxy reads {routes_path}, the ConfigMap key {ROUTES_KEY} is at {mount['mountPath']}"
    )
    volume = volumes[mount["name"]]["configMap"]
    assert "items" not in volume, "items remaps keys; mount the whole ConfigMap"
    # No subPath anywhere on a ConfigMap or Secret: those never see updates.
    for workload in workloads(docs):
        spec = workload["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                if "configMap" in vols[m["name"]] or "secret" in vols[m["name"]]:
                    assert "subPath" not in m, f"{workload['metadata']['name']}: {m}"


def test_grace_period_covers_drain_and_shutdown(docs):
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for container in pod["containers"]:
            facts = PROXY if image_name(container["image"]) == "canary-proxy" else PING
            need = seconds(setting(container, facts, "drain")) + seconds(setting(container, facts, "shutdown"))
            assert grace >= need, (
                f"{workload['metadata']['name']}: terminationGracePeriodSeconds {grace} < "
                f"drain delay + shutdown timeout ({need:g}s); the kubelet would SIGKILL mid-drain"
            )


def test_load_balancer_exposes_only_the_traffic_port(docs):
    proxy = proxy_workload(docs)
    container = container_of(proxy, "canary-proxy")
    traffic = listen_port(setting(container, PROXY, "listen"))
    admin = listen_port(setting(container, PROXY, "admin"))
    balancers = [s for s in of_kind(docs, "Service") if s["spec"].get("type") in ("LoadBalancer", "NodePort")]
    assert [s["metadata"]["name"] for s in balancers] == ["canary-proxy"]
    for service in balancers:
        targets = [resolve_port(container, p.get("targetPort", p["port"])) for p in service["spec"]["ports"]]
        assert admin not in targets, f"Service {service['metadata']['name']} exposes the admin port"
        assert targets == [traffic]
        assert [p["port"] for p in service["spec"]["ports"]] == [80]
    admin_services = [s for s in of_kind(docs, "Service")
                      if s["spec"].get("type", "ClusterIP") == "ClusterIP"
                      and selected_workloads(docs, s["spec"]["selector"]) == [proxy]]
    assert len(admin_services) == 1
    annotations = admin_services[0]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(admin)
    assert annotations.get("prometheus.io/path") == "/metrics"


# --- tests: posture --------------------------------------------------------------------------------


def test_restricted_security_context_and_resources(docs):
    for workload in workloads(docs):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), name
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["runAsNonRoot"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            assert not sc["capabilities"].get("add"), name
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][section]), f"{name}: {section}"


def test_rolling_updates_never_reduce_capacity(docs):
    for workload in workloads(docs):
        strategy = workload["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, workload["metadata"]["name"]
        assert strategy["rollingUpdate"]["maxSurge"] == 1, workload["metadata"]["name"]


def test_proxy_spreads_across_nodes(docs):
    proxy = proxy_workload(docs)
    keys = [c["topologyKey"] for c in proxy["spec"]["template"]["spec"].get("topologySpreadConstraints", [])]
    assert "kubernetes.io/hostname" in keys


# --- tests: CRD resources (monitoring) -------------------------------------------------------------------


def crd_docs() -> list[dict]:
    seen = []
    for path in KUSTOMIZATIONS:
        seen += [d for d in render(path) if d["apiVersion"].startswith("monitoring.coreos.com/")]
    return seen


def test_monitoring_is_rendered_somewhere():
    kinds = {d["kind"] for d in crd_docs()}
    assert {"ServiceMonitor", "PrometheusRule"} <= kinds


def _dropped_keys(given, kept, where="") -> list[str]:
    """Keys present in `given` but not in the model's dump `kept`: unknown fields."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [where or "."]
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{where}.{key}")
            else:
                out += _dropped_keys(value, kept[key], f"{where}.{key}")
        return out
    if isinstance(given, list) and isinstance(kept, list):
        return [k for i, (g, c) in enumerate(zip(given, kept)) for k in _dropped_keys(g, c, f"{where}[{i}]")]
    return []


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PrometheusRule"])
def test_crd_resources_match_the_operator_schema(kind):
    # kubernetes-validate has no schemas for CRDs. These models are generated
    # from the Prometheus Operator's CRD OpenAPI schemas (types, enums,
    # patterns, required fields); the round trip finds unknown fields, which
    # the models would otherwise ignore.
    from cloudcoil.models.prometheus_operator import v1

    model = getattr(v1, kind)
    docs = [d for d in crd_docs() if d["kind"] == kind]
    assert docs
    for doc in docs:
        parsed = model.model_validate(doc)
        kept = parsed.model_dump(by_alias=True, exclude_none=True, mode="json")
        unknown = [k for k in _dropped_keys(doc, kept) if not k.startswith(".metadata.")]
        assert not unknown, f"{kind}/{doc['metadata']['name']}: unknown fields {unknown}"


def test_service_monitor_scrapes_the_admin_service():
    monitored = [list(render(p)) for p in KUSTOMIZATIONS if of_kind(list(render(p)), "ServiceMonitor")]
    assert monitored, "no kustomization renders a ServiceMonitor"
    for docs in monitored:
        proxy = proxy_workload(docs)
        container = container_of(proxy, "canary-proxy")
        admin = listen_port(setting(container, PROXY, "admin"))
        for monitor in of_kind(docs, "ServiceMonitor"):
            services = [s for s in of_kind(docs, "Service")
                        if selects(monitor["spec"]["selector"], s["metadata"].get("labels", {}))]
            assert [s["metadata"]["name"] for s in services] == ["canary-proxy-admin"], (
                f"ServiceMonitor selects {[s['metadata']['name'] for s in services]}"
            )
            port_names = {p.get("name"): p for p in services[0]["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in port_names, f"ServiceMonitor port {endpoint['port']!r}"
                assert resolve_port(container, port_names[endpoint["port"]]["targetPort"]) == admin
                assert endpoint.get("path", "/metrics") == "/metrics"


# --- tests: the walkthrough's patches ---------------------------------------------------------------------


ROUTE_PATCHES = sorted(EXAMPLES.glob("routes-*.yaml"))


def test_walkthrough_patches_exist():
    assert ROUTE_PATCHES, f"no routes patches in {EXAMPLES}"


@pytest.mark.parametrize("patch", ROUTE_PATCHES, ids=[p.name for p in ROUTE_PATCHES])
def test_walkthrough_routes_patches_are_valid(patch, tmp_path):
    """docs/kubernetes.md shifts weights with `kubectl patch configmap
    canary-proxy-routes --type merge --patch-file k8s/examples/routes-*.yaml`.
    Apply each one offline (kubectl patch --local) to the shipped ConfigMap
    and hold the result to the same checks as the shipped routes; its
    [rollback] table must be the shipped one."""
    body = yaml.safe_load(patch.read_text())
    assert set(body) == {"data"} and set(body["data"]) == {ROUTES_KEY}, (
        f"{patch.name} must change only data.{ROUTES_KEY}"
    )
    docs = copy.deepcopy(list(render(K8S)))
    cm = one(docs, "ConfigMap", ROUTES_CONFIGMAP)
    cm_file = tmp_path / "configmap.yaml"
    cm_file.write_text(yaml.safe_dump(cm))
    out = subprocess.run(
        ["kubectl", "patch", "--local", "-f", str(cm_file), "--type", "merge",
         "--patch-file", str(patch), "-o", "yaml"],
        capture_output=True, text=True, check=False,
    )
    assert out.returncode == 0, f"kubectl patch --local with {patch.name} failed:\n{out.stderr}"
    patched = yaml.safe_load(out.stdout)
    text = patched["data"][ROUTES_KEY]
    result = proxy_check(text, tmp_path)
    assert result.returncode == 0, f"canary-proxy check rejects {patch.name}:\n{result.stdout}{result.stderr}"
    routes = tomllib.loads(text)
    cm["data"] = patched["data"]
    check_upstreams(docs, routes)
    assert routes["rollback"]["target"] == ALERT_ROLLBACK_TARGET
    # A patch replaces the whole file. It moves weights; if it also changed
    # [rollback], the walkthrough would change the policy without saying so
    # (and restart every version's evidence).
    shipped = tomllib.loads(routes_text(list(render(K8S))))["rollback"]
    assert routes["rollback"] == shipped, (
        f"{patch.name}: [rollback] differs from k8s/base/routes.toml's: {routes['rollback']} != {shipped}"
    )


# --- tests: example routes files for other services ----------------------------------------------


ROUTES_FILES = sorted(EXAMPLES.glob("*/routes.toml"))


def test_example_routes_files_exist():
    assert ROUTES_FILES, f"no example routes files under {EXAMPLES}/*/"


@pytest.mark.parametrize("path", ROUTES_FILES, ids=[str(p.relative_to(EXAMPLES)) for p in ROUTES_FILES])
def test_example_routes_files_pass_check(path, tmp_path):
    """The routes files docs point to (k8s/examples/grpc/routes.toml for a
    gRPC service; sticky/, override/ and mirror/ for docs/routing.md;
    progressive/ and blue-green-gated/ for docs/progressive.md) are valid
    for this build of `canary-proxy check`, and each shows what it is for: a
    gRPC example speaks h2c to every version; the routing and progress
    examples use the shipped Services and [rollback] table, and check's
    summary describes their table."""
    text = path.read_text()
    result = proxy_check(text, tmp_path)
    assert result.returncode == 0, f"canary-proxy check rejects {path}:\n{result.stdout}{result.stderr}"
    routes = tomllib.loads(text)
    # The summary line of a table: one that names the table and `detail`.
    def summary_mentions(table: str, detail: str) -> bool:
        return any(table in line and detail in line for line in result.stdout.splitlines())

    example = path.parent.name
    if example == "grpc":
        assert all(v.get("protocol") == "h2c" for v in routes["versions"].values()), routes
        assert "over h2c" in result.stdout, result.stdout
    if example in ("sticky", "override", "mirror"):
        # Copied into a cluster as they are: the shipped Services, and the
        # shipped policy unchanged.
        check_upstreams(list(render(K8S)), routes)
        shipped = tomllib.loads(routes_text(list(render(K8S))))["rollback"]
        assert routes.get("rollback") == shipped, f"{path}: [rollback] differs from k8s/base/routes.toml's"
        assert {"sticky", "override", "mirror"} & set(routes) == {example}, (
            f"{path} is the [{example}] example: it should have that table and no other of the three"
        )
    if example == "sticky":
        sticky = routes["sticky"]
        forms = [k for k in ("header", "cookie", "client_address") if k in sticky]
        assert forms == ["cookie"], f"{path}: [sticky] should key on exactly one form, the cookie: {forms}"
        assert sticky.get("set_cookie") is True, f"{path}: the web app example sets the cookie"
        assert summary_mentions("sticky", sticky["cookie"]), result.stdout
    if example == "override":
        override = routes["override"]
        nets = [ipaddress.ip_network(n) for n in override.get("allow_from", [])]
        assert nets and all(n.is_private for n in nets), (
            f"{path}: allow_from should limit the header to private networks: {nets}"
        )
        assert any(v["weight"] == 0 for v in routes["versions"].values()), (
            f"{path}: the override example reaches a version at weight 0"
        )
        assert summary_mentions("override", override["header"]), result.stdout
    if example == "mirror":
        mirror = routes["mirror"]
        assert mirror["version"] in routes["versions"], f"{path}: mirrors a version that does not exist"
        assert routes["versions"][mirror["version"]]["weight"] == 0, (
            f"{path}: a dark launch mirrors to a version at weight 0"
        )
        assert 0 < mirror["share"] <= 1, mirror
        assert set(mirror.get("methods", ["GET", "HEAD", "OPTIONS"])) <= {"GET", "HEAD", "OPTIONS"}, (
            f"{path}: mirroring anything but safe methods makes every change twice"
        )
        assert summary_mentions("mirror", mirror["version"]), result.stdout
    if example in ("progressive", "blue-green-gated"):
        check_upstreams(list(render(K8S)), routes)
        shipped = tomllib.loads(routes_text(list(render(K8S))))["rollback"]
        assert routes.get("rollback") == shipped, f"{path}: [rollback] differs from k8s/base/routes.toml's"
        # The stepped version exists and is judged: the rollback target never
        # is, so no step of it could pass.
        version = routes["progress"]["version"]
        assert version in routes["versions"], f"{path}: [progress] steps up a version that does not exist"
        assert version != routes["rollback"]["target"], f"{path}: [progress] steps up the rollback target"
        progress_lines = [line for line in result.stdout.splitlines() if line.startswith("progress:")]
        assert any(f"`{version}`" in line for line in progress_lines), (
            f"{path}: check's summary has no progress: line naming `{version}`:\n{result.stdout}"
        )
    if example == "blue-green-gated":
        # Green is judged at 0% on copies, then switched to all of the traffic.
        assert routes["progress"]["steps"] == [0, 100], routes["progress"]
        assert routes["mirror"]["version"] == routes["progress"]["version"], (
            f"{path}: the copies must go to the version the switch is gated on"
        )


# --- tests: alerts point at their runbook ---------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, spaces to
    hyphens, punctuation other than hyphens and underscores dropped."""
    anchors = set()
    for line in markdown.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            text = m.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_that_exists():
    """Each shipped alert links the section of docs/troubleshooting.md that
    says what to do, and describes what to look at first."""
    rules = [d for d in crd_docs() if d["kind"] == "PrometheusRule"]
    assert rules
    for doc in rules:
        for group in doc["spec"]["groups"]:
            for rule in group["rules"]:
                if "alert" not in rule:
                    continue
                annotations = rule.get("annotations", {})
                assert "look" in annotations.get("description", "").lower(), (
                    f"{rule['alert']}: the description must say what to look at first"
                )
                url = annotations.get("runbook_url", "")
                page, _, anchor = url.partition("#")
                assert page == "docs/troubleshooting.md" and anchor, (
                    f"{rule['alert']}: runbook_url {url!r} is not docs/troubleshooting.md#<section>"
                )
                assert anchor in github_anchors((REPO / page).read_text()), (
                    f"{rule['alert']}: docs/troubleshooting.md has no section #{anchor}"
                )


# --- tests: the autoscaler ------------------------------------------------------------------------


def parse_cpu(value: str | int | float) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_autoscaler_scales_the_proxy_on_cpu_within_its_limit(docs):
    proxy = proxy_workload(docs)
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    assert len(hpas) == 1, "one HorizontalPodAutoscaler, for the proxy"
    spec = hpas[0]["spec"]
    ref = spec["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", proxy["metadata"]["name"])
    # A re-apply sets replicas back to the manifest's; that must not be below
    # the HPA's floor, and the floor keeps the PodDisruptionBudget satisfiable
    # with one pod drained.
    assert spec["minReplicas"] == proxy["spec"]["replicas"] >= 2
    assert spec["maxReplicas"] > spec["minReplicas"]
    pdbs = [p for p in of_kind(docs, "PodDisruptionBudget")
            if selected_workloads(docs, p["spec"]["selector"]) == [proxy]]
    assert all(spec["minReplicas"] > p["spec"]["minAvailable"] for p in pdbs)
    cpu = [m["resource"] for m in spec["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert len(cpu) == 1, "scales on CPU"
    target = cpu[0]["target"]
    limit = parse_cpu(container_of(proxy, "canary-proxy")["resources"]["limits"]["cpu"])
    if target["type"] == "AverageValue":
        # Above the limit the target is never reached: the HPA would never scale.
        assert 0 < parse_cpu(target["averageValue"]) < limit
    else:
        assert target["type"] == "Utilization"
