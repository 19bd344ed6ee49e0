"""Faults survived, on the session's local Ray (loopback only): scenarios live in tests/fault_scenarios.py.

Every scenario drives traffic with the documented client retry policy
(serve/http_client.py) and injects one fault mid-stream; bench/faults.py
runs the same code with more traffic and writes bench/results/faults.json.
"""

from __future__ import annotations

import pytest

from banditroute.testkit import fault_scenarios as fs
from banditroute.testkit.s3server import s3_proxy, s3_server  # noqa: F401

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def assert_nothing_lost(r):
    assert r["failed"] == 0, r["errors"]
    assert r["rewards_acknowledged"] > 0
    assert r["rewards_found_in_log"] == r["rewards_recorded"] >= r["rewards_acknowledged"], r
    assert r["rewards_logged_twice"] == 0, r


def test_router_replica_killed_under_load(serve_instance, tmp_path):
    r = fs.kill_router_replica(serve_instance, str(tmp_path), n=60, concurrency=6)
    assert_nothing_lost(r)
    assert len(r["replica_versions"]) == 2 and all(v >= r["newest_version"] for v in r["replica_versions"].values())


def test_feedback_actor_killed_mid_stream(serve_instance, tmp_path):
    r = fs.kill_feedback_actor(serve_instance, str(tmp_path), n=60, concurrency=6)
    assert_nothing_lost(r)
    assert r["replayed"] > 0 and r["replayed_not_duplicate"] == []  # retried rewards are ignored
    assert r["log_rows"] == r["rewards_recorded"]  # nothing else (no double write) in the log


def test_learner_killed_resumes_and_versions_never_go_back(serve_instance, tmp_path):
    r = fs.kill_learner(serve_instance, str(tmp_path), n=60, concurrency=6)
    assert_nothing_lost(r)
    assert r["version_resumed"] >= r["checkpoint_version"] and r["version_resumed"] >= r["version_before_kill"]
    assert r["version_after"] > r["version_resumed"]
    assert r["ps_version_decreases"] == 0 and r["learner_version_decreases"] == 0 and r["version_samples"] > 10


def test_s3_outage_buffers_then_drains_and_full_buffer_is_503(serve_instance, tmp_path, s3_proxy):  # noqa: F811
    r = fs.s3_outage(serve_instance, str(tmp_path), s3_proxy, n=60, concurrency=6, outage_s=3.0, spool_max_events=40)
    assert_nothing_lost(r)
    assert r["backpressure_status"] == 503 and "event buffer full" in r["backpressure_message"]
    assert r["backpressure_retry_after"] is not None
    assert r["spooled"] > 0 and r["drained"] == r["spooled"] and r["spool_full_rejections"] > 0
