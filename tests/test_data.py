import numpy as np
import pandas as pd
import pytest

from banditroute.core.data import DataError, load_routing_data, split_by_prompt, split_by_task
from banditroute.testkit.synthetic import make_routing_data


def test_round_trip_parquet(tmp_path):
    data = make_routing_data(30, with_responses=True)
    path = data.save(tmp_path / "d.parquet")
    back = load_routing_data(path)
    assert back.models == data.models
    assert back.prompts == data.prompts
    np.testing.assert_allclose(back.scores, data.scores)
    np.testing.assert_allclose(back.costs, data.costs)
    assert back.responses[0, 0] == "answer of cheap-math to 0"


def _frame():
    return make_routing_data(10).to_frame()


def _write(tmp_path, frame):
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    return path


def test_models_discovered_from_cost_columns(tmp_path):
    frame = _frame()
    frame["extra_metadata"] = 1.0  # a numeric column without |total_cost is not a model
    data = load_routing_data(_write(tmp_path, frame))
    assert data.models == ("cheap-math", "cheap-code", "expensive")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.drop(columns=["prompt"]), "missing column"),
        (lambda f: f.drop(columns=[c for c in f.columns if c.endswith("|total_cost")]), "no models"),
        (lambda f: f.drop(columns=["expensive"]), "missing score column"),
        (lambda f: f.assign(**{"expensive|total_cost": -1.0}), "negative cost in column 'expensive|total_cost'"),
        (lambda f: f.assign(**{"cheap-code": 1.5}), "score outside \\[0, 1\\] in column 'cheap-code'"),
        (lambda f: f.assign(**{"cheap-code|total_cost": np.nan}), "missing cost"),
        (lambda f: f.assign(sample_id="same"), "not unique"),
        (lambda f: f.iloc[:0], "no rows"),
    ],
)
def test_bad_data_named(tmp_path, mutate, message):
    with pytest.raises(DataError, match=message):
        load_routing_data(_write(tmp_path, mutate(_frame())))


def test_nan_scores_kept_and_filled(tmp_path):
    frame = _frame()
    frame.loc[0, "expensive"] = np.nan
    data = load_routing_data(_write(tmp_path, frame))
    assert np.isnan(data.scores[0, 2])
    assert data.scores_filled[0, 2] == 0.0


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported"):
        load_routing_data(tmp_path / "x.json")


class _RunsCode:
    ran = False

    def __reduce__(self):
        return (setattr, (_RunsCode, "ran", True))


@pytest.mark.parametrize("suffix", [".pkl", ".pickle", ".csv"])
def test_data_files_are_parquet_only_and_a_pickle_is_never_read(tmp_path, suffix):
    import pickle

    path = tmp_path / f"d{suffix}"
    path.write_bytes(pickle.dumps(_RunsCode()) if suffix != ".csv" else b"sample_id,prompt\n1,hi\n")
    with pytest.raises(DataError, match=r"^train_data: .*unsupported file type .*must be Parquet"):
        load_routing_data(path, field_name="train_data")
    assert not _RunsCode.ran
    with pytest.raises(DataError, match="^path: "):
        make_routing_data(5).save(tmp_path / "out.pkl")  # nothing writes a format that cannot be read back


def test_a_non_parquet_file_with_a_parquet_name_is_a_clear_error(tmp_path):
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="data: .*not a readable Parquet file"):
        load_routing_data(tmp_path / "fake.parquet")


def test_prompt_split_is_seeded_and_disjoint():
    data = make_routing_data(100)
    tr1, te1 = split_by_prompt(data, 0.2, seed=3)
    tr2, te2 = split_by_prompt(data, 0.2, seed=3)
    _, te3 = split_by_prompt(data, 0.2, seed=4)
    assert list(te1.sample_ids) == list(te2.sample_ids)
    assert list(te1.sample_ids) != list(te3.sample_ids)
    assert len(te1) == 20 and not set(tr1.sample_ids) & set(te1.sample_ids)


def test_task_split_holds_out_whole_tasks():
    data = make_routing_data(90)
    train, test = split_by_task(data, ["code"])
    assert set(test.eval_names) == {"code"} and "code" not in set(train.eval_names)
    train, test = split_by_task(data, seed=1)
    assert not set(train.eval_names) & set(test.eval_names)
    with pytest.raises(DataError, match="unknown task"):
        split_by_task(data, ["poetry"])


def test_shared_data_loads_when_present():
    from banditroute.core.data import default_data_dir

    root = default_data_dir()
    if root is None:
        pytest.skip("../shared/data is not present")
    data = load_routing_data(root / "routerbench" / "train.parquet")
    assert data.n_models == 11 and len(data) > 1000
    assert data.responses is not None
