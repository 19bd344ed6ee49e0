"""Evaluation functions, the report files and the `banditroute eval` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from banditroute.cli import main
from banditroute.core.data import RoutingData
from banditroute.policy.barp import NetworkConfig
from banditroute.policy.encoders import EncoderConfig, embed_prompts
from banditroute.policy.evaluate import (
    build_report,
    evaluate_routers,
    parse_grid,
    render_markdown,
    score_choices,
    write_report,
)
from banditroute.policy.reward import DEFAULT_PREFERENCE_GRID
from banditroute.policy.baselines import make_routers
from banditroute.policy.train import TrainConfig, train_bandit_policy


def table(scores, costs, models=("a", "b")) -> RoutingData:
    n = len(scores)
    return RoutingData(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        prompts=[f"p{i}" for i in range(n)],
        eval_names=np.array(["t"] * n),
        models=tuple(models),
        scores=np.asarray(scores, dtype=np.float32),
        costs=np.asarray(costs, dtype=np.float64),
    )


def test_score_choices_counts_nan_as_zero_and_uses_tau():
    data = table([[1.0, np.nan], [0.0, 1.0]], [[2.0, 1.0], [2.0, 4.0]])
    out = score_choices(np.array([1, 1]), data, w_cost=0.5, tau=2.0)
    assert out == pytest.approx({"w_cost": 0.5, "score": 0.5, "cost": 2.5, "reward": 0.5 * 0.5 - 0.5 * (0.5 + 1.0) / 2})
    with pytest.raises(ValueError):
        score_choices(np.array([0, 2]), data, 0.0, 1.0)
    with pytest.raises(ValueError):
        score_choices(np.array([0]), data, 0.0, 1.0)


def test_parse_grid():
    assert parse_grid(None) == tuple(DEFAULT_PREFERENCE_GRID)
    assert parse_grid("0, 0.5,1") == (0.0, 0.5, 1.0)
    for bad in ("0,x", "0,1.5", "-0.1", "nan"):
        with pytest.raises(ValueError):
            parse_grid(bad)


def test_report_files_and_schema(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    data = table((rng.uniform(size=(n, 3)) < [0.3, 0.6, 0.9]).astype(float), np.tile([0.1, 0.2, 1.0], (n, 1)), ("x", "y", "z"))
    emb = rng.normal(size=(n, 5)).astype(np.float32)
    grid = (0.0, 0.3, 0.9)
    routers = make_routers(["random", "single", "best-single", "oracle"], data.models)
    results, seconds = evaluate_routers(routers, data, emb, data, emb, grid, tau=1.0, seed=0)
    assert set(seconds) == set(results)
    report = build_report(results, grid, 1.0, len(data), data={"train": "mem"})
    paths = write_report(report, tmp_path / "out")
    for p in paths.values():
        assert p.exists() and p.stat().st_size > 0

    loaded = json.loads(paths["json"].read_text())
    assert loaded["preferences"] == [0.0, 0.3, 0.9]
    assert set(loaded["routers"]) == {"random", "single:x", "single:y", "single:z", "best-single", "oracle"}
    for name, points in loaded["routers"].items():
        assert [p["w_cost"] for p in points] == loaded["preferences"]
        for p in points:
            assert set(p) == {"w_cost", "score", "cost", "reward"}
            assert all(isinstance(v, float) for v in p.values())
        assert loaded["summary"][name]["mean_reward"] == pytest.approx(np.mean([p["reward"] for p in points]))
    assert loaded["upper_bounds"] == ["oracle"] and loaded["n_test"] == n and loaded["data"] == {"train": "mem"}
    # single:z always pays 1.0 and scores its mean
    assert all(p["cost"] == pytest.approx(1.0) for p in loaded["routers"]["single:z"])

    md = paths["md"].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")][2:]
    assert rows[0].startswith("| oracle (upper bound")
    assert len(rows) == 6 and "mean reward" in md and "w=0.3" in md
    assert render_markdown(loaded) == md
    with pytest.raises(ValueError, match="grid"):
        build_report(results, (0.0, 0.5), 1.0, n)


WORDS = {"a": "apple banana cherry", "b": "delta echo foxtrot", "c": "golf hotel india"}


def write_tiny_split(folder, rng):
    """Prompts of three topics; model m-<topic> answers its own topic, 'big' answers all at a high price."""
    models = ("m-a", "m-b", "m-c", "big")
    for name, n in (("train", 90), ("test", 30)):
        topic = rng.integers(0, 3, size=n)
        prompts = [f"{WORDS['abc'[t]]} question {i} {name}" for i, t in enumerate(topic)]
        scores = np.full((n, 4), 0.1)
        scores[np.arange(n), topic] = 1.0
        scores[:, 3] = 0.9
        scores[0, 0] = np.nan
        costs = np.tile([0.001, 0.001, 0.001, 0.02], (n, 1))
        RoutingData(
            sample_ids=np.array([f"{name}{i}" for i in range(n)]),
            prompts=prompts,
            eval_names=np.array(["abc"[t] for t in topic]),
            models=models,
            scores=scores.astype(np.float32),
            costs=costs,
        ).save(folder / f"{name}.parquet")
    return folder / "train.parquet", folder / "test.parquet"


def test_eval_command_smoke(tmp_path, capsys):
    from banditroute.core.data import load_routing_data

    train_path, test_path = write_tiny_split(tmp_path, np.random.default_rng(0))
    train = load_routing_data(train_path)
    encoder = EncoderConfig(name="hashing", dim=64)
    cache = tmp_path / "cache"
    emb, encoder_id = embed_prompts(train.prompts, encoder, cache)
    config = TrainConfig(epochs=3, batch_size=32, network=NetworkConfig(hidden_dim=16, n_hidden_layers=1, preference_dim=4))
    policy, _, _ = train_bandit_policy(train, emb, config, encoder, encoder_id)
    ckpt = policy.save(tmp_path / "policy")

    out = tmp_path / "eval"
    rc = main([
        "eval", "--train", str(train_path), "--test", str(test_path), "--policy", str(ckpt), "--out", str(out),
        "--grid", "0,0.5,0.9", "--cache-dir", str(cache), "--seed", "1",
        "--set", "full_info.epochs=5", "--set", "linucb.passes=1", "--set", "knn.k=5",
    ])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(out)
    assert any(line.startswith("| **policy**") for line in printed)
    for name in ("report.json", "report.md", "pareto.png"):
        assert (out / name).exists()
    report = json.loads((out / "report.json").read_text())
    assert report["preferences"] == [0.0, 0.5, 0.9]
    assert "policy" in report["routers"] and "oracle" in report["routers"]
    assert {f"single:{m}" for m in ("m-a", "m-b", "m-c", "big")} <= set(report["routers"])
    assert report["tau"] == pytest.approx(policy.tau) and report["n_test"] == 30
    assert report["encoder_id"] == encoder_id

    # only some routers; an unknown one is a clear error, not a traceback
    rc = main(["eval", "--train", str(train_path), "--test", str(test_path), "--policy", str(ckpt),
               "--out", str(tmp_path / "eval2"), "--routers", "policy,single:big", "--cache-dir", str(cache)])
    assert rc == 0
    report = json.loads((tmp_path / "eval2" / "report.json").read_text())
    assert set(report["routers"]) == {"policy", "single:big"}
    assert report["preferences"] == list(DEFAULT_PREFERENCE_GRID)
    rc = main(["eval", "--train", str(train_path), "--test", str(test_path), "--policy", str(ckpt),
               "--out", str(tmp_path / "eval3"), "--routers", "bogus", "--cache-dir", str(cache)])
    assert rc == 2
