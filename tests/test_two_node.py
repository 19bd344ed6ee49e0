"""Two Ray nodes on one machine (issue 14, item 9): the worker node's raylet is killed under load and rejoins.

The scenario (banditroute.testkit.two_node) needs its OWN Ray cluster, so it runs
in a subprocess with a private RAY_TMPDIR: the session cluster of conftest.py is
untouched, and no other process's ray.init() can find this one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = [pytest.mark.timeout(600)]


def test_worker_node_lost_under_load_then_rejoined(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="br2n-", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    out = tmp_path / "row.json"
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "banditroute.testkit.two_node", "--out", str(out), "--n", "60"],
                              env=env, capture_output=True, text=True, timeout=560)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    # placement: one Router replica per node, the loop's actors on the head
    assert sorted(r["replicas_before"].values()) == ["head", "worker"], r
    assert all(r["loop_actors_on_head"].values()), r
    # the node died and came back; the lost replica was rescheduled on the new node
    assert r["served_on_one_node"] > 0 and sorted(r["replicas_after"].values()) == ["head", "new worker"], r
    # nothing acknowledged was lost or doubled; failures (if any) are routes in flight on the dead node, never rewards
    assert r["rewards_acknowledged"] > 0 and r["rewards_found_in_log"] == r["rewards_recorded"] >= r["rewards_acknowledged"], r
    assert r["rewards_logged_twice"] == 0 and r["failed_routes_only"], (r["errors"], r)  # the errors first: pytest truncates r
    # weights reach the new replica; the served version never goes backwards
    assert r["newest_version"] > r["start_version"] and all(v >= r["newest_version"] for v in r["replica_versions"].values()), r
    assert r["version_decreases"] == 0 and r["version_samples"] > 10, r
