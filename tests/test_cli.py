"""Smoke tests of the CLI entry points with tiny budgets."""

from pathlib import Path

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
    data_path = make_routing_data(90).save(tmp_path / "data.parquet")
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
    frame.to_parquet(tmp_path / "bad.parquet", index=False)
    assert main(["train", "--data", str(tmp_path / "bad.parquet"), "--out", str(tmp_path / "o"), "--set", "encoder.name=hashing"]) == 2
    assert "missing column" in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path, capsys):
    data_path = make_routing_data(20).save(tmp_path / "d.parquet")
    assert main(["train", "--data", str(data_path), "--out", str(tmp_path / "o"), "--set", "train.epochz=2"]) == 2
    assert "epochz" in capsys.readouterr().err


EXAMPLE_APP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "app.example.yaml"


def test_serve_flags_are_app_config_overrides():
    """`banditroute serve` reads the application config (its `serve:` section is Serve's, not the router's)."""
    from banditroute.cli import build_parser
    from banditroute.cli.commands.serve import overrides_from_flags
    from banditroute.cluster.config import load_app_config

    args = build_parser().parse_args(["serve", "--config", str(EXAMPLE_APP_CONFIG), "--policy", "runs/p", "--replicas", "2",
                                      "--replay", "--num-cpus", "3", "--set", "router.max_batch_size=8", "--set", "router.num_replicas=5"])
    app = load_app_config(args.config, overrides_from_flags(args), environ={})
    assert (app.router.policy, app.router.num_replicas, app.router.max_batch_size) == ("runs/p", 2, 8)
    assert app.online.initial_policy == "runs/p"  # the loop's starting policy too (serve learns by default)
    assert app.router.replay.enabled and app.start.num_cpus == 3
    assert app.router.upstreams["gpt-4"].api_key_env == "OPENAI_API_KEY" and app.serve.router_autoscaling.max_replicas == 4


def test_up_flags_defaults_and_fresh_storage(tmp_path):
    """`banditroute up`: UP_DEFAULTS < config file < env < --set < flags; storage is fresh per run unless given."""
    from datetime import datetime

    import yaml

    from banditroute.cli import build_parser
    from banditroute.cli.commands.up import overrides_from_flags
    from banditroute.cluster.up import check_up, load_up_config
    from banditroute.core.config import ConfigError

    args = build_parser().parse_args(["up", "--out", str(tmp_path / "o"), "--replicas", "3", "--encoder", "hashing", "--seed", "7",
                                      "--policy", "s3://b/seed", "--max-decisions", "9", "--set", "learner.learning_rate=3e-4"])
    app = load_up_config(None, overrides_from_flags(args), environ={}, now=datetime(2024, 1, 2, 3, 4, 5))
    check_up(app)
    assert (app.router.num_replicas, app.router.num_cpus, app.router.port, app.router.seed) == (3, 0.5, 0, 7)
    assert (app.up.cold_start.encoder, app.up.seed, app.up.max_decisions, app.up.out) == ("hashing", 7, 9, str(tmp_path / "o"))
    assert app.online.enabled and app.online.initial_policy == "s3://b/seed" and app.learner.learning_rate == 3e-4
    assert app.storage.uri == str((tmp_path / "o" / "storage" / "run-20240102-030405").resolve())
    assert app.router.parameter_server_name == "banditroute-parameter-server" and app.router.policy is None

    config = tmp_path / "up.yaml"
    config.write_text(yaml.safe_dump({"router": {"num_replicas": 4, "num_cpus": 0.25}, "storage": {"uri": str(tmp_path / "s")},
                                      "up": {"cold_start": {"network": {"hidden_dim": 32}}}}))
    app = load_up_config(config, {"router.num_replicas": "5"}, environ={})
    assert (app.router.num_replicas, app.router.num_cpus, app.router.num_gpus) == (5, 0.25, 0.0)
    assert app.storage.uri == str(tmp_path / "s") and app.up.cold_start.network.hidden_dim == 32
    with pytest.raises(ValueError, match=r"router\.host"):
        check_up(load_up_config(None, {"router.host": "0.0.0.0"}, environ={}))
    with pytest.raises(ConfigError, match=r"online\.enabled"):
        load_up_config(None, {"online.enabled": "false"}, environ={})
    for key, value in (("up.concurrency", "0"), ("up.cold_start.encoder", "bert"), ("up.curve_windw", "5")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_up_config(None, {key: value}, environ={})
