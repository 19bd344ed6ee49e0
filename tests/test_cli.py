"""Smoke tests of the CLI entry points with tiny budgets."""

import pytest

from banditroute.cli import SUBCOMMANDS, main
from banditroute.policy.checkpoint import load_policy
from banditroute.testkit.synthetic import make_routing_data


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: banditroute " + command in capsys.readouterr().out


@pytest.mark.parametrize("kind, train_sets", [("barp", ["train.epochs=3"]), ("identity", ["train.epochs=2", "train.irt.steps=60", "train.irt.identity_steps=40"])])
def test_split_then_train_prints_a_loadable_checkpoint(tmp_path, capsys, kind, train_sets):
    data_path = make_routing_data(90).save(tmp_path / "data.csv")
    assert main(["split", "--data", str(data_path), "--by", "task", "--test-tasks", "code", "--out", str(tmp_path / "split")]) == 0
    capsys.readouterr()
    args = ["train", "--data", str(tmp_path / "split" / "train.parquet"), "--out", str(tmp_path / "run"), "--kind", kind,
            "--cache-dir", str(tmp_path / "cache"), "--set", "encoder.name=hashing", "--seed", "3"]
    for item in train_sets:
        args += ["--set", item]
    assert main(args) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    policy = load_policy(last_line)
    assert sorted(policy.models) == ["cheap-code", "cheap-math", "expensive"]
    assert (tmp_path / "run" / "training_decisions.parquet").exists()


def test_bad_data_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    frame = make_routing_data(10).to_frame().drop(columns=["eval_name"])
    frame.to_csv(tmp_path / "bad.csv", index=False)
    assert main(["train", "--data", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "o"), "--set", "encoder.name=hashing"]) == 2
    assert "missing column" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    data_path = make_routing_data(20).save(tmp_path / "d.parquet")
    assert main(["train", "--data", str(data_path), "--out", str(tmp_path / "o"), "--set", "train.epochz=2"]) == 2
    assert "epochz" in capsys.readouterr().err
