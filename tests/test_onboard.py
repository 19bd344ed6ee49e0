"""Onboarding a new model end to end (through banditroute.cli.main), bad input, live quizzes, onboard-eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from banditroute.cli import main
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.checkpoint import load_policy
from banditroute.policy.identity_train import train_identity_policy
from banditroute.policy.onboard import QuizError, read_quiz_results
from banditroute.policy.quiz_runner import QuizRunner, ReferenceScorer, ReplayLoggedScorer
from test_identity_policy import embed, make_data, small_config

NEW = "newcomer"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An identity policy trained WITHOUT 'newcomer', and the data file that has its scores."""
    root = tmp_path_factory.mktemp("onboard")
    data = make_data(n=180, seed=1)
    responses = np.empty((len(data), data.n_models), dtype=object)
    for k, m in enumerate(data.models):
        responses[:, k] = [f"{m} says answer-{i}" for i in range(len(data))]
    data = type(data)(**{**data.__dict__, "responses": responses})
    data_path = data.save(root / "data.parquet")
    without = data.select_models([m for m in data.models if m != NEW])
    emb, enc_id, enc = embed(without)
    policy, _, _ = train_identity_policy(without, emb, small_config(epochs=2), enc, enc_id)
    ckpt = policy.save(root / "policy")
    barp = BarpPolicy(PolicyMeta(models=["a", "b"], tau=1.0, embed_dim=64, network=NetworkConfig(hidden_dim=8)))
    barp_path = barp.save(root / "barp")
    return {"root": root, "data": data, "data_path": data_path, "ckpt": ckpt, "barp": barp_path}


def copy_ckpt(world, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "policy"
    shutil.copytree(world["ckpt"], dst)
    return dst


def scores_frame(world, rows, by="sample_id") -> pd.DataFrame:
    data = world["data"]
    col = data.model_index(NEW)
    frame = pd.DataFrame({"score": data.scores[rows, col]})
    if by in ("sample_id", "both"):
        frame.insert(0, "sample_id", data.sample_ids[rows])
    if by in ("prompt", "both"):
        frame.insert(0, "prompt", [data.prompts[i] for i in rows])
    return frame


def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


def test_onboard_from_data_end_to_end(world, tmp_path, capsys):
    out = tmp_path / "onboarded"
    registry_before = (world["ckpt"] / "registry.json").read_bytes()
    rc, stdout, err = run_cli(
        ["onboard", "--policy", world["ckpt"], "--model", NEW, "--price", "0.001",
         "--from-data", world["data_path"], "--quiz", 10, "--out", out, "--cache-dir", "none"],
        capsys,
    )
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(out)
    policy = load_policy(out)
    assert policy.models[-1] == NEW
    entry = policy.registry.get(NEW)
    assert entry.source == "quiz" and entry.n_observations == 10 and entry.price == 0.001
    assert (world["ckpt"] / "registry.json").read_bytes() == registry_before  # source untouched
    # strong and cheap: it gets traffic at once, without retraining
    emb, _, _ = embed(world["data"])
    picked = [policy.models[a] for a in policy.decide(emb, 0.3).actions]
    assert picked.count(NEW) > 0.2 * len(picked)


def test_onboard_from_results_file_in_place(world, tmp_path, capsys):
    ckpt = copy_ckpt(world, tmp_path)
    path = tmp_path / "quiz.csv"
    scores_frame(world, np.arange(40), by="prompt").to_csv(path, index=False)
    rc, stdout, err = run_cli(
        ["onboard", "--policy", ckpt, "--model", NEW, "--price", "0.002", "--scores", path, "--quiz", 12, "--cache-dir", "none",
         "--quiz-strategy", "stratified"],
        capsys,
    )
    assert rc == 0, err
    assert NEW in load_policy(ckpt).models  # the checkpoint's registry was updated in place
    # parquet + sample_id resolved through --data
    ckpt2 = tmp_path / "second"
    import shutil

    shutil.copytree(world["ckpt"], ckpt2)
    pq_path = tmp_path / "quiz.parquet"
    scores_frame(world, np.arange(20)).to_parquet(pq_path)
    rc, _, err = run_cli(
        ["onboard", "--policy", ckpt2, "--model", NEW, "--price", "0", "--scores", pq_path,
         "--data", world["data_path"], "--quiz", 20, "--cache-dir", "none"],
        capsys,
    )
    assert rc == 0, err
    assert load_policy(ckpt2).registry.get(NEW).n_observations == 20


def _write(tmp_path, frame: pd.DataFrame | str) -> Path:
    path = tmp_path / "bad.csv"
    if isinstance(frame, str):
        path.write_text(frame)
    else:
        frame.to_csv(path, index=False)
    return path


BAD_CASES = {
    "unknown model": (dict(model="ghost", source="from-data"), "unknown model 'ghost'"),
    "negative price": (dict(price="-0.5"), "price must be >= 0"),
    "non-numeric price": (dict(price="cheap"), "expected a number"),
    "nan price": (dict(price="nan"), "finite"),
    "already registered": (dict(model="mid", source="from-data"), "already registered"),
    "quiz too small": (dict(quiz=2), "--quiz must be >= 5"),
    "too few rows": (dict(csv="sample_id,score\ns0,1\ns1,0\ns2,1\n"), "too few rows"),
    "non-numeric score": (dict(csv="sample_id,score\ns0,1\ns1,zero\n"), "row 2: score 'zero' is not a number"),
    "score above 1": (dict(csv="sample_id,score\ns0,1.5\n"), "row 1: score 1.5 outside [0, 1]"),
    "negative score": (dict(csv="sample_id,score\ns0,1\ns1,-0.1\n"), "row 2: score -0.1 outside [0, 1]"),
    "missing score": (dict(csv="sample_id,score\ns0,\n"), "row 1: missing score"),
    "no score column": (dict(csv="sample_id,points\ns0,1\n"), "missing column 'score'"),
    "no prompt column": (dict(csv="score\n1\n"), "'prompt' or a 'sample_id'"),
    "unknown sample_id": (dict(csv="sample_id,score\ns0,1\nzzz,1\n"), "row 2: unknown sample_id 'zzz'"),
    "duplicate row": (dict(csv="sample_id,score\ns0,1\ns0,0\n"), "row 2: duplicate sample_id"),
    "other model's results": (dict(csv="sample_id,model,score\ns0,mid,1\n"), "results of model 'mid'"),
    "no source": (dict(source="none"), "give the new model's quiz scores"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_a_clear_error_and_registers_nothing(world, tmp_path, capsys, case):
    spec, message = BAD_CASES[case]
    ckpt = copy_ckpt(world, tmp_path)
    before = (ckpt / "registry.json").read_bytes()
    args = ["onboard", "--policy", ckpt, "--model", spec.get("model", NEW), "--price", spec.get("price", "0.001"),
            "--quiz", spec.get("quiz", 5), "--cache-dir", "none", "--data", world["data_path"]]
    if "csv" in spec:
        args += ["--scores", _write(tmp_path, spec["csv"])]
    elif spec.get("source", "from-data") == "from-data":
        args += ["--from-data", world["data_path"]]
    rc, _, err = run_cli(args, capsys)
    assert rc == 2
    assert message in err, err
    assert (ckpt / "registry.json").read_bytes() == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_missing_price_and_barp_checkpoint(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["onboard", "--policy", str(world["ckpt"]), "--model", NEW, "--from-data", str(world["data_path"])])
    assert info.value.code == 2
    assert "--price" in capsys.readouterr().err
    rc, _, err = run_cli(
        ["onboard", "--policy", world["barp"], "--model", NEW, "--price", "1", "--from-data", world["data_path"]], capsys
    )
    assert rc == 2 and "onboarding needs an identity policy" in err


def test_read_quiz_results_validates_types(world, tmp_path):
    path = tmp_path / "q.csv"
    scores_frame(world, np.arange(6), by="both").to_csv(path, index=False)
    res = read_quiz_results(path, model=NEW)
    assert len(res) == 6 and res.sample_ids[0] == "s0"
    with pytest.raises(QuizError, match="pass the routing data"):
        scores_frame(world, np.arange(6)).to_csv(path, index=False)
        read_quiz_results(path)
    with pytest.raises(FileNotFoundError):
        read_quiz_results(tmp_path / "missing.csv")
    (tmp_path / "q.txt").write_text("x")
    with pytest.raises(QuizError, match="unsupported"):
        read_quiz_results(tmp_path / "q.txt")


def test_quiz_runner_against_the_replay_upstream(world, tmp_path, capsys):
    from banditroute.serve.replay import ReplayIndex, ReplayServer

    data = world["data"]
    server = ReplayServer(ReplayIndex(data))
    base_url = server.start()
    try:
        rows = [0, 5, 9]
        prompts = [data.prompts[i] for i in rows]
        ids = [str(data.sample_ids[i]) for i in rows]
        logged = QuizRunner(base_url, NEW, ReplayLoggedScorer(), concurrency=2).run(prompts, ids)
        np.testing.assert_array_equal(logged, data.scores[rows, data.model_index(NEW)])
        refs = {ids[0]: "answer-0", ids[1]: "answer-6", ids[2]: "answer-9"}
        graded = QuizRunner(base_url, NEW, ReferenceScorer(refs)).run(prompts, ids)
        assert graded.tolist() == [1.0, 0.0, 1.0]
        with pytest.raises(QuizError, match="HTTP 404"):
            QuizRunner(base_url, "not-served", ReplayLoggedScorer()).run(prompts[:1], ids[:1])
        with pytest.raises(QuizError, match="no reference"):
            QuizRunner(base_url, NEW, ReferenceScorer({})).run(prompts[:1], ids[:1])
        # the whole command, calling the upstream live
        ckpt = copy_ckpt(world, tmp_path)
        rc, stdout, err = run_cli(
            ["onboard", "--policy", ckpt, "--model", NEW, "--price", "0.001", "--upstream", base_url,
             "--scorer", "replay", "--data", world["data_path"], "--quiz", 8, "--cache-dir", "none"],
            capsys,
        )
        assert rc == 0, err
        assert load_policy(ckpt).registry.get(NEW).n_observations == 8
    finally:
        server.stop()
    with pytest.raises(QuizError, match="unreachable"):
        QuizRunner(base_url, NEW, ReplayLoggedScorer(), timeout_s=2).run(["x"], ["s0"])


def test_quiz_out_then_scores(world, tmp_path, capsys):
    quiz_path = tmp_path / "quiz.csv"
    rc, stdout, err = run_cli(
        ["onboard", "--policy", world["ckpt"], "--model", NEW, "--price", "0.001", "--data", world["data_path"],
         "--quiz", 6, "--quiz-out", quiz_path, "--cache-dir", "none"],
        capsys,
    )
    assert rc == 0, err
    quiz = pd.read_csv(quiz_path)
    assert list(quiz.columns) == ["sample_id", "prompt"] and len(quiz) == 6


def test_onboard_eval_contract(world, tmp_path, capsys):
    out = tmp_path / "eval"
    rc, stdout, err = run_cli(
        ["onboard-eval", "--data", world["data_path"], "--holdout-model", NEW, "--quiz", "5,10", "--out", out,
         "--epochs", 2, "--cache-dir", "none", "--set", "encoder.name=hashing", "--set", "encoder.dim=64",
         "--set", "train.irt.dim=2", "--set", "train.irt.steps=100", "--set", "train.irt.identity_steps=100",
         "--set", "train.quiz_bank_size=2", "--set", "train.network.hidden_dim=32", "--set", "train.network.attention_heads=2"],
        capsys,
    )
    assert rc == 0, err
    assert stdout.strip().splitlines()[-1] == str(out / "onboard.json")
    doc = json.loads((out / "onboard.json").read_text())
    assert set(doc) == {"model", "rows", "retrained_mean_reward", "without_model_mean_reward"}
    assert doc["model"] == NEW
    assert [r["quiz"] for r in doc["rows"]] == [5, 10]
    assert all(set(r) == {"quiz", "mean_reward"} and np.isfinite(r["mean_reward"]) for r in doc["rows"])
    assert np.isfinite(doc["retrained_mean_reward"]) and np.isfinite(doc["without_model_mean_reward"])
    rc, _, err = run_cli(
        ["onboard-eval", "--data", world["data_path"], "--holdout-model", "ghost", "--out", out, "--cache-dir", "none",
         "--set", "encoder.name=hashing"],
        capsys,
    )
    assert rc == 2 and "unknown model 'ghost'" in err
