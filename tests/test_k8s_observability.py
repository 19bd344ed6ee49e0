"""The prod overlay's Grafana dashboard and Prometheus alerts: they render, and every metric they name exists in the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROD = ROOT / "k8s" / "overlays" / "prod"
SOURCE_ROOTS = ("core", "policy", "serve", "feedback", "learner", "cluster")
# Prometheus series of a Ray metric: ray_<name>, histograms add _bucket/_sum/_count.
SERIES = re.compile(r"\bray_(banditroute_[a-z0-9_]+?)(?:_bucket|_sum|_count)?\b")
REGISTRATION = re.compile(r"""metric\(\s*"(?:counter|gauge|histogram)",\s*"(banditroute_[a-z0-9_]+)"|(STAGE_LATENCY_METRIC) = "(banditroute_[a-z0-9_]+)\"""")


def registered_metrics() -> set[str]:
    """Names of the metrics the code registers (serve/metrics.py's ``metric(kind, name, ...)`` calls)."""
    names: set[str] = set()
    for root in SOURCE_ROOTS:
        for path in (ROOT / root).rglob("*.py"):
            for m in REGISTRATION.finditer(path.read_text()):
                names.add(m.group(1) or m.group(3))
    return names


def named_metrics(text: str) -> set[str]:
    return {m.group(1) for m in SERIES.finditer(text)}


def resolve(name: str, known: set[str]) -> bool:
    """A series name matches a registered metric (a histogram's _bucket/_sum/_count were stripped lazily)."""
    return name in known or any(name == k + suffix for k in known for suffix in ("_bucket", "_sum", "_count"))


def dashboard() -> dict:
    doc = yaml.safe_load((PROD / "grafana-dashboard.yaml").read_text())
    assert doc["kind"] == "ConfigMap" and doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(doc["data"]["banditroute.json"])


def rules() -> list[dict]:
    doc = yaml.safe_load((PROD / "prometheus-rules.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def test_the_dashboard_has_the_panels_operators_need():
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for wanted in ("traffic share per model", "reward", "spend", "policy version per replica", "gate decisions",
                   "feedback lag", "5xx", "latency per stage"):
        assert wanted in titles, f"dashboard lacks a panel on {wanted!r}: {titles}"


def test_at_least_four_alerts_each_with_an_expression_and_a_summary():
    alerts = rules()
    assert len(alerts) >= 4
    for rule in alerts:
        assert rule["alert"] and rule["expr"].strip() and rule["annotations"]["summary"]
    names = {r["alert"] for r in alerts}
    assert {"BanditrouteHigh5xxRate", "BanditrouteFeedbackLagging", "BanditrouteLearnerStalled",
            "BanditrouteReplicaOnOldVersion"} <= names
    assert {"BanditrouteGateHolding", "BanditrouteSpendHigh"} <= names


def test_the_alerts_read_the_learner_and_feedback_actor_metrics_not_serving_side_proxies():
    by_name = {r["alert"]: named_metrics(r["expr"]) for r in rules()}
    assert "banditroute_feedback_delivery_lag_s" in by_name["BanditrouteFeedbackLagging"]
    assert "banditroute_learner_last_update_timestamp_seconds" in by_name["BanditrouteLearnerStalled"]
    assert by_name["BanditrouteGateHolding"] == {"banditroute_gate_held_since_timestamp_seconds"}
    assert by_name["BanditrouteSpendHigh"] == {"banditroute_spend_usd_total"}
    assert "banditroute_learner_serving_version" in by_name["BanditrouteReplicaOnOldVersion"]
    known = registered_metrics()
    assert {"banditroute_gate_state", "banditroute_gate_last_promotion_timestamp_seconds",
            "banditroute_feedback_learner_queue_events", "banditroute_feedback_delivery_errors_total"} <= known


def test_every_metric_named_in_the_dashboard_and_alerts_is_registered_in_the_code():
    known = registered_metrics()
    assert {"banditroute_requests_total", "banditroute_stage_latency_ms", "banditroute_policy_version"} <= known
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]] + [r["expr"] for r in rules()]
    used = set().union(*(named_metrics(e) for e in exprs))
    assert len(used) >= 8
    missing = sorted(n for n in used if not resolve(n, known))
    assert missing == [], f"metrics named in k8s/overlays/prod but registered nowhere: {missing} (known: {sorted(known)})"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_dashboard_and_the_rules():
    out = subprocess.run(["kubectl", "kustomize", str(PROD)], capture_output=True, text=True, timeout=120, check=True).stdout
    objects = [d for d in yaml.safe_load_all(out) if d]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("ConfigMap", "banditroute-dashboard") in kinds and ("PrometheusRule", "banditroute-alerts") in kinds
    assert all(o["metadata"].get("namespace") == "banditroute" for o in objects if o["kind"] in ("ConfigMap", "PrometheusRule"))


def test_the_serving_docs_metrics_table_lists_every_registered_metric():
    table = (ROOT / "docs" / "serving.md").read_text()
    missing = sorted(n for n in registered_metrics() if f"`ray_{n}`" not in table)
    assert missing == [], f"docs/serving.md's metrics table lacks {missing}"
