"""`banditroute train-from-log`: offline retraining on a real Parquet event log, checked on held-out recent events."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from banditroute.cli import main
from banditroute.feedback.log import EventLog
from banditroute.learner.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint
from banditroute.learner.offline import OfflineRetrainConfig, split_recent, train_offline
from banditroute.learner.config import LearnerConfig
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.reward import fit_tau, reward
from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import StorageConfig, open_storage
from banditroute.testkit.synthetic import make_routing_data


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A random starting policy routed synthetic prompts (explore); its events are in a real event log."""
    data = make_routing_data(200, seed=4)
    enc_cfg = EncoderConfig(name="hashing", dim=32)
    encoder = make_encoder(enc_cfg)
    emb = encoder.encode(data.prompts)
    torch.manual_seed(0)
    meta = PolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=emb.shape[1], encoder=enc_cfg,
                      encoder_id=encoder.encoder_id, network=NetworkConfig(hidden_dim=32, preference_dim=8), policy_version=7)
    start = BarpPolicy(meta)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(data), 3000)
    w = rng.uniform(0, 1, rows.size)
    dec = start.decide(emb[rows], w, explore=True, generator=torch.Generator().manual_seed(1))
    events = [
        JoinedEvent(
            DecisionRecord(f"d{i}", float(i), emb[r].tolist(), float(w[i]), list(data.models), data.models[dec.actions[i]],
                           float(dec.propensities[i]), 7, encoder_id=encoder.encoder_id),
            float(data.scores_filled[r, dec.actions[i]]), float(data.costs[r, dec.actions[i]]), float(i) + 0.5,
        )
        for i, r in enumerate(rows)
    ]
    root = tmp_path_factory.mktemp("retrain") / "storage"
    storage = open_storage(StorageConfig(uri=str(root)))
    log = EventLog(storage)
    for lo in range(0, len(events), 1000):
        log.append_events(events[lo : lo + 1000])
    save_checkpoint(storage.child("checkpoints"), start)
    return {"data": data, "emb": emb, "start": start, "root": root, "table": events_to_table(events), "rows": rows, "w": w}


def true_value(policy, emb, data, rows, w) -> float:
    """Expected reward of the policy's explore distribution, from the FULL outcome table (tests only)."""
    full = reward(data.scores_filled[rows], data.costs[rows], w[:, None], policy.tau)
    with torch.no_grad():
        probs = torch.softmax(policy.logits(emb[rows], w), dim=-1).numpy()
    return float((probs * full).sum(axis=1).mean())


def test_holdout_is_the_most_recent_events(logged):
    train, holdout = split_recent(logged["table"], 0.2)
    assert len(holdout) == 600 and len(train) == 2400
    assert min(holdout.column("reward_time").to_pylist()) > max(train.column("reward_time").to_pylist())


def test_offline_training_improves_the_policy_and_the_check_sees_it(logged):
    start = logged["start"]
    cfg = OfflineRetrainConfig(epochs=4, batch_size=256)
    candidate, report = train_offline(logged["table"], start, LearnerConfig(learning_rate=3e-3), cfg)
    assert candidate.policy_version > start.policy_version and report["updates"] == 4 * 10
    assert report["events_trained"] == 4 * 2400  # the holdout was never trained on
    args = (logged["emb"], logged["data"], logged["rows"], logged["w"])
    assert true_value(candidate, *args) > true_value(start, *args) + 0.01
    gate = report["gate"]  # the online promotion gate's rule, on the most recent held-out events
    assert report["passed"] and gate["promote"] and gate["candidate"]["value"] > gate["serving"]["value"]
    assert gate["n_events"] == 600 and gate["serving_version"] == start.policy_version
    with pytest.raises(ValueError, match="min_events"):
        train_offline(logged["table"].slice(0, 50), start, LearnerConfig(), cfg)


def test_command_writes_candidate_and_report_to_storage(logged, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    code = main(["train-from-log", "--set", f"storage.uri={logged['root']}", "--since-hours", "0", "--epochs", "2",
                 "--report", str(report_path)])
    assert code in (0, 3)
    report = json.loads(report_path.read_text())
    assert report["start_version"] == 7 and report["holdout_events"] == 600
    assert ("PASSED" in capsys.readouterr().out) and (code == 0) == report["passed"]
    storage = open_storage(StorageConfig(uri=str(logged["root"])))
    runs = sorted({k.split("/")[1] for k in storage.list("offline")})
    out = storage.child(f"offline/{runs[-1]}")
    assert list_checkpoints(out) == [report["candidate_version"]]
    assert load_latest_checkpoint(out)[0].policy_version == report["candidate_version"]
    assert out.read_json("report.json")["passed"] == report["passed"]
    assert list_checkpoints(storage.child("checkpoints")) == [7]  # the online learner's prefix is untouched


def test_command_errors_name_the_problem(tmp_path, capsys):
    assert main(["train-from-log", "--set", f"storage.uri={tmp_path}", "--holdout-fraction", "1.5"]) == 2
    assert "holdout_fraction" in capsys.readouterr().err
    assert main(["train-from-log", "--set", f"storage.uri={tmp_path}"]) == 2
    assert "--policy" in capsys.readouterr().err
