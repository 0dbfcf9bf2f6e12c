"""The metrics artefacts agree with the code: the alert rules pass `promtool
check rules` and their unit tests (`promtool test rules`), the PrometheusRule
says what alerts.yaml says, every metric the dashboard and the alerts query
is one meshgate exports, docs/operations.md lists every metric and alert, and
the compose and Kubernetes files turn --metrics-listen on where their scrape
configurations look, and every entry point's --help documents it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from meshgate.common import config
from meshgate.common.testing import in_ci

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRICS_PY = ROOT / "services/common/src/meshgate/common/metrics.py"
ALERTS = DEPLOY / "prometheus/alerts.yaml"
UNITS = {"s": "_seconds", "By": "_bytes"}
COUNTERS = ("create_counter", "create_observable_counter")


def exported() -> dict[str, str]:
    """Prometheus name -> OpenTelemetry name of every instrument metrics.py creates
    (the exporter's mapping: dots to underscores, the unit's base name, _total
    for counters)."""
    src = METRICS_PY.read_text()
    out = {}
    for m in re.finditer(r'(create_\w+)\(\s*"([\w.]+)"(.*?)\)', src, re.S):
        kind, name, rest = m.groups()
        unit = re.search(r'unit="([^"]*)"', rest)
        prom, suffix = name.replace(".", "_"), UNITS.get(unit.group(1) if unit else "", "")
        prom += "" if prom.endswith(suffix) else suffix
        out[prom + ("_total" if kind in COUNTERS else "")] = name
    return out


def queried(expr: str) -> set[str]:
    names = set(re.findall(r"\b(meshgate_[a-z_]+|rpc_server_[a-z_]+)", expr))  # not the rpc_* labels
    out = set()
    for n in names:
        for suffix in ("_bucket", "_count", "_sum"):
            if n.endswith(suffix) and n[: -len(suffix)] in exported():
                n = n[: -len(suffix)]
        out.add(n)
    return out


def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(path).exists():
        if in_ci():
            pytest.fail("CI=true but promtool is missing (Debian package prometheus)")
        pytest.skip("needs promtool (Debian package prometheus)")
    return path


def test_exported_names_are_what_the_prometheus_test_queries():
    names = exported()
    for n in ("meshgate_controlplane_convergence_duration_seconds", "rpc_server_duration_seconds",
              "meshgate_gatewayd_apply_failures_total", "meshgate_gatewayd_peers_handshake_max_age_seconds",
              "meshgate_controlplane_agents_connected", "meshgate_etcd_operation_duration_seconds"):
        assert n in names, sorted(names)
    assert len(names) >= 30


def test_alert_rules_check_and_their_unit_tests_pass():
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool, "test", "rules", "alerts.test.yaml"], cwd=ALERTS.parent, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_cover_the_issue_and_query_exported_metrics():
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    for a in ("MeshgateNodeNotConverged", "MeshgateAgentDisconnected", "MeshgateApplyFailures",
              "MeshgateHandshakeStale"):
        assert a in alerts
    assert alerts["MeshgateNodeNotConverged"]["for"] == "5m"
    for r in rules:
        assert queried(r["expr"]) <= set(exported()), (r["alert"], queried(r["expr"]) - set(exported()))


def test_prometheusrule_says_what_alerts_yaml_says():
    pr = yaml.safe_load((DEPLOY / "kubernetes/monitoring/prometheusrule.yaml").read_text())
    assert pr["kind"] == "PrometheusRule" and pr["spec"] == yaml.safe_load(ALERTS.read_text())


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((DEPLOY / "grafana/meshgate.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used: set[str] = set()
    for e in exprs:
        q = queried(e)
        assert q, e
        assert q <= set(exported()), (e, q - set(exported()))
        used |= q
    for must in ("meshgate_controlplane_convergence_duration_seconds", "meshgate_gatewayd_apply_duration_seconds",
                 "meshgate_etcd_operation_duration_seconds", "rpc_server_duration_seconds"):
        assert must in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_operations_doc_lists_every_metric_and_alert():
    doc = (ROOT / "docs/operations.md").read_text()
    missing = [n for n in exported() if f"`{n}`" not in doc]
    assert not missing, f"docs/operations.md does not list {missing}"
    # ... and lists nothing else: each row of its metric tables names an exported
    # metric, with the instrument's type.
    rows = dict(re.findall(r"^\| `((?:meshgate|rpc)_\w+)` \| (\w+) \|", doc, re.M))
    assert set(rows) == set(exported()), (set(rows) ^ set(exported()))
    src = METRICS_PY.read_text()
    for prom, name in exported().items():
        [kind] = re.findall(rf'(create_\w+)\(\s*"{re.escape(name)}"', src)
        want = "counter" if kind in COUNTERS else "histogram" if kind == "create_histogram" else "gauge"
        assert rows[prom] == want, (prom, rows[prom], want)
    for r in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]:
        assert r["alert"] in doc


def test_compose_metrics_override_and_scrape_config_agree(tmp_path):
    over = yaml.safe_load((DEPLOY / "compose/compose.metrics.yaml").read_text())
    scrape = yaml.safe_load((DEPLOY / "compose/prometheus.yml").read_text())
    targets = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in scrape["scrape_configs"]}
    from meshgate.controlplane.main import ControlPlaneConfig
    from meshgate.keyservice.main import KeyServiceConfig

    for svc, cls in (("keyservice", KeyServiceConfig), ("controlplane", ControlPlaneConfig)):
        env = over["services"][svc]["environment"]
        loaded = config.load(cls, [], prog=svc, environ=env, env_prefix=f"MESHGATE_{svc.upper()}_")
        port = loaded.config.metrics_listen.rsplit(":", 1)[1]
        assert targets[f"meshgate-{svc}"] == f"{svc}:{port}"
        assert "ports" not in over["services"][svc], "metrics stay on the private network"
    gw = over["services"]["gatewayd"]["environment"]["MESHGATE_GATEWAYD_METRICS_LISTEN"]
    assert targets["meshgate-gatewayd"].endswith(":" + gw.rsplit(":", 1)[1])
    assert all(p.startswith("127.0.0.1:") for p in over["services"]["prometheus"]["ports"])
    # promtool checks the scrape configuration (with the rules where the container mounts them)
    cfg = tmp_path / "prometheus.yml"
    shutil.copy(ALERTS, tmp_path / "alerts.yaml")
    cfg.write_text((DEPLOY / "compose/prometheus.yml").read_text().replace("/etc/prometheus/alerts.yaml",
                                                                           str(tmp_path / "alerts.yaml")))
    r = subprocess.run([promtool(), "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_pods_serve_metrics_where_their_annotations_say():
    for f, name in (("controlplane", "meshgate-controlplane"), ("keyservice", "meshgate-keyservice"),
                    ("gatewayd", "meshgate-gatewayd")):
        docs = [d for d in yaml.safe_load_all((DEPLOY / f"kubernetes/{f}.yaml").read_text()) if d]
        [wl] = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet") and d["metadata"]["name"] == name]
        ann = wl["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        [c] = wl["spec"]["template"]["spec"]["containers"]
        [listen] = [a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics-listen=")]
        assert listen.rsplit(":", 1)[1] == ann["prometheus.io/port"], (f, listen)
    np = yaml.safe_load((DEPLOY / "kubernetes/monitoring/networkpolicy.yaml").read_text())
    assert np["spec"]["ingress"][0]["ports"] == [{"port": 9464, "protocol": "TCP"}]


def test_help_documents_metrics_listen():
    import argparse

    from meshgate.common import config
    from meshgate.controlplane.main import ControlPlaneConfig
    from meshgate.gatewayd.main import build_parser
    from meshgate.keyservice.main import KeyServiceConfig

    for cls in (ControlPlaneConfig, KeyServiceConfig):
        out = config.build_parser(cls, "x", "").format_help()
        assert "--metrics-listen" in out and "Prometheus" in out, cls
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    out = sub.choices["run"].format_help()
    for flag in ("--metrics-listen", "--no-metrics-per-peer", "--metrics-peer-cap"):
        assert flag in out
