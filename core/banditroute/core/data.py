"""Routing data in the RouterBench "wide" layout.

One row per prompt: ``sample_id``, ``prompt``, ``eval_name``, then per model
``<model>`` (quality score in [0, 1], NaN when no answer was recorded),
``<model>|total_cost`` (USD) and optionally ``<model>|model_response``.
Models are discovered from the ``|total_cost`` columns, so any file written
this way loads, whatever its pool of models.

NaN scores. A NaN score means "no answer was recorded" for that model on
that prompt. We keep the NaN in ``RoutingData.scores`` (so it can be
counted and reported) and every consumer reads ``scores_filled`` instead,
where NaN counts as 0: an answer that does not exist is a failed answer,
in training, in evaluation and in the replay driver alike. A NaN cost is
an error, since it is unclear what was paid.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

COST_SUFFIX = "|total_cost"
RESPONSE_SUFFIX = "|model_response"
REQUIRED_COLUMNS = ("sample_id", "prompt", "eval_name")
# Parquet only: a pickle runs code when it is read, and text formats lose types. Convert other files once,
# in a trusted environment (``pd.read_csv(...).to_parquet(...)``).
SUPPORTED_SUFFIXES = (".parquet",)

# The real RouterBench release, used only when no local data is configured.
ROUTERBENCH_HF_REPO = "withmartian/routerbench"
ROUTERBENCH_HF_FILE = "routerbench_0shot.pkl"


class DataError(ValueError):
    """Routing data does not follow the RouterBench wide layout."""


@dataclass(frozen=True)
class RoutingData:
    """Per-prompt outcomes of a pool of models (one row per prompt)."""

    sample_ids: np.ndarray
    """Unique id of each prompt, shape (n,)."""
    prompts: list[str]
    """Prompt text of each row."""
    eval_names: np.ndarray
    """Task each prompt comes from, shape (n,)."""
    models: tuple[str, ...]
    """Model names, in column order; index k of scores/costs is models[k]."""
    scores: np.ndarray
    """Quality scores in [0, 1], shape (n, k), NaN where no answer was recorded."""
    costs: np.ndarray
    """USD cost of each model's answer, shape (n, k), >= 0."""
    responses: np.ndarray | None = field(default=None, repr=False)
    """Logged answer texts, shape (n, k) of object (None where absent), or None."""
    source: str = ""
    """Where the data was read from (for messages and provenance)."""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def scores_filled(self) -> np.ndarray:
        """Scores with NaN counted as 0 (see module docstring)."""
        return np.nan_to_num(self.scores, nan=0.0)

    def model_index(self, name: str) -> int:
        try:
            return self.models.index(name)
        except ValueError:
            raise DataError(f"unknown model {name!r}; known: {list(self.models)}") from None

    def take(self, rows: Sequence[int] | np.ndarray) -> "RoutingData":
        """Rows ``rows`` of this data, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return RoutingData(
            sample_ids=self.sample_ids[rows],
            prompts=[self.prompts[i] for i in rows],
            eval_names=self.eval_names[rows],
            models=self.models,
            scores=self.scores[rows],
            costs=self.costs[rows],
            responses=None if self.responses is None else self.responses[rows],
            source=self.source,
        )

    def select_models(self, names: Sequence[str]) -> "RoutingData":
        """The same prompts restricted to models ``names`` (in that order)."""
        cols = [self.model_index(n) for n in names]
        return RoutingData(
            sample_ids=self.sample_ids,
            prompts=self.prompts,
            eval_names=self.eval_names,
            models=tuple(names),
            scores=self.scores[:, cols],
            costs=self.costs[:, cols],
            responses=None if self.responses is None else self.responses[:, cols],
            source=self.source,
        )

    def to_frame(self) -> pd.DataFrame:
        """Back to the wide layout (round-trips through ``load_routing_data``)."""
        columns: dict[str, object] = {
            "sample_id": self.sample_ids,
            "prompt": self.prompts,
            "eval_name": self.eval_names,
        }
        for k, model in enumerate(self.models):
            columns[model] = self.scores[:, k]
        for k, model in enumerate(self.models):
            columns[model + COST_SUFFIX] = self.costs[:, k]
        if self.responses is not None:
            for k, model in enumerate(self.models):
                columns[model + RESPONSE_SUFFIX] = self.responses[:, k]
        return pd.DataFrame(columns)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the wide layout to a .parquet file (the only format :func:`load_routing_data` reads)."""
        path = Path(path)
        _check_suffix(path, "path")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_parquet(path, index=False)
        return path

    def fingerprint(self) -> str:
        """Short content hash of prompts, models and outcomes (for provenance)."""
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(p.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        h.update("\0".join(self.models).encode())
        h.update(np.ascontiguousarray(np.nan_to_num(self.scores, nan=-1.0)).tobytes())
        h.update(np.ascontiguousarray(self.costs).tobytes())
        return h.hexdigest()[:16]


def _check_suffix(path: Path, field_name: str) -> None:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        hint = " (pickles are refused: reading one can run arbitrary code)" if suffix in (".pkl", ".pickle") else ""
        raise DataError(f"{field_name}: {path}: unsupported file type {suffix or '(none)'!r}{hint}; "
                        f"routing data must be Parquet ({', '.join(SUPPORTED_SUFFIXES)})")


def read_frame(path: str | os.PathLike, field_name: str = "data") -> pd.DataFrame:
    """Read a wide-layout table from a Parquet file; ``field_name`` names the option it came from in errors."""
    path = Path(path)
    _check_suffix(path, field_name)
    if not path.exists():
        raise DataError(f"{field_name}: {path}: no such file")
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: not a Parquet file
        raise DataError(f"{field_name}: {path}: not a readable Parquet file ({exc})") from None


def frame_to_routing_data(frame: pd.DataFrame, source: str = "") -> RoutingData:
    """Validate a wide-layout frame and convert it; errors name the problem."""
    where = f"{source}: " if source else ""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{where}missing column(s) {missing}; the RouterBench layout needs {list(REQUIRED_COLUMNS)}")
    models = tuple(str(c)[: -len(COST_SUFFIX)] for c in frame.columns if str(c).endswith(COST_SUFFIX))
    if not models:
        raise DataError(f"{where}no models found: expected columns named '<model>{COST_SUFFIX}'")
    no_score = [m for m in models if m not in frame.columns]
    if no_score:
        raise DataError(f"{where}missing score column(s) for model(s) {no_score} (have their {COST_SUFFIX} columns)")
    if len(frame) == 0:
        raise DataError(f"{where}no rows")
    if frame["sample_id"].isna().any():
        raise DataError(f"{where}column 'sample_id' has missing values")
    if frame["sample_id"].duplicated().any():
        dup = frame.loc[frame["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise DataError(f"{where}column 'sample_id' is not unique (e.g. {dup!r})")
    if frame["prompt"].isna().any() or not all(isinstance(p, str) for p in frame["prompt"]):
        raise DataError(f"{where}column 'prompt' must hold text in every row")

    try:
        scores = frame[list(models)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}score columns must be numeric") from None
    finite = scores[~np.isnan(scores)]
    if finite.size and (finite.min() < 0 or finite.max() > 1):
        bad_col = next(m for m in models if ((frame[m] < 0) | (frame[m] > 1)).any())
        raise DataError(f"{where}score outside [0, 1] in column {bad_col!r}")

    try:
        costs = frame[[m + COST_SUFFIX for m in models]].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}cost columns must be numeric") from None
    if np.isnan(costs).any():
        bad_col = next(m + COST_SUFFIX for m in models if frame[m + COST_SUFFIX].isna().any())
        raise DataError(f"{where}missing cost in column {bad_col!r}")
    if (costs < 0).any():
        bad_col = next(m + COST_SUFFIX for m in models if (frame[m + COST_SUFFIX] < 0).any())
        raise DataError(f"{where}negative cost in column {bad_col!r}")

    responses = None
    if any((m + RESPONSE_SUFFIX) in frame.columns for m in models):
        responses = np.empty((len(frame), len(models)), dtype=object)
        for k, m in enumerate(models):
            col = m + RESPONSE_SUFFIX
            if col in frame.columns:
                responses[:, k] = [v if isinstance(v, str) else None for v in frame[col]]

    return RoutingData(
        sample_ids=frame["sample_id"].astype(str).to_numpy(),
        prompts=list(frame["prompt"]),
        eval_names=frame["eval_name"].astype(str).to_numpy(),
        models=models,
        scores=scores.astype(np.float32),
        costs=costs,
        responses=responses,
        source=source,
    )


def load_routing_data(path: str | os.PathLike, field_name: str = "data") -> RoutingData:
    """Load and validate a wide-layout Parquet file (``field_name``: the option named in errors)."""
    return frame_to_routing_data(read_frame(path, field_name), source=str(path))


def default_data_dir() -> Path | None:
    """``../shared/data`` next to the working directory or the repo, when present."""
    candidates = [Path.cwd() / ".." / "shared" / "data", Path(__file__).resolve().parents[2] / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return None


def resolve_data_path(path: str | os.PathLike | None, default_name: str = "routerbench/train.parquet") -> Path:
    """Explicit path, else ``<shared data>/<default_name>``; DataError when neither exists."""
    if path is not None:
        return Path(path)
    data_dir = default_data_dir()
    if data_dir is not None and (data_dir / default_name).exists():
        return data_dir / default_name
    # The Hub release is a pickle, which is never read here (reading one runs code): no silent download.
    raise DataError(f"data: no local routing data (looked for ../shared/data/{default_name}); pass --data PATH to a "
                    f"Parquet file. {ROUTERBENCH_HF_REPO}/{ROUTERBENCH_HF_FILE} is a pickle: convert it once, in a "
                    f"trusted environment, with pd.read_pickle(...).to_parquet(...)")


def download_routerbench(cache_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the RouterBench pickle from the Hugging Face hub (needs network access) for a one-off conversion.

    banditroute never reads the pickle itself (:func:`read_frame` is Parquet-only); convert it in a trusted
    environment and pass the Parquet file.
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise DataError("no local data and huggingface_hub is not installed") from exc
    try:
        local = hf_hub_download(
            repo_id=ROUTERBENCH_HF_REPO,
            filename=ROUTERBENCH_HF_FILE,
            repo_type="dataset",
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as exc:
        raise DataError(
            f"no local routing data found (looked for ../shared/data) and downloading "
            f"{ROUTERBENCH_HF_REPO}/{ROUTERBENCH_HF_FILE} failed: {exc}. Pass --data PATH."
        ) from exc
    return Path(local)


# --- splits -----------------------------------------------------------------

def split_by_prompt(data: RoutingData, test_fraction: float = 0.2, seed: int = 0) -> tuple[RoutingData, RoutingData]:
    """Random prompt-level split: every task appears on both sides."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))
    n_test = max(1, int(round(test_fraction * len(data))))
    if n_test >= len(data):
        raise DataError(f"not enough rows ({len(data)}) to split")
    return data.take(np.sort(order[n_test:])), data.take(np.sort(order[:n_test]))


def split_by_task(
    data: RoutingData,
    test_tasks: Sequence[str] | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> tuple[RoutingData, RoutingData]:
    """Hold out whole tasks (``eval_name``): the test tasks are never seen in training.

    With ``test_tasks`` unset, tasks are drawn at random (seeded) until about
    ``test_fraction`` of the prompts are held out; at least one task stays on
    each side.
    """
    tasks = sorted(set(data.eval_names.tolist()))
    if len(tasks) < 2:
        raise DataError(f"a task split needs at least 2 tasks in eval_name, found {tasks}")
    if test_tasks is None:
        rng = np.random.default_rng(seed)
        counts = {t: int((data.eval_names == t).sum()) for t in tasks}
        chosen: list[str] = []
        for t in rng.permutation(tasks).tolist():
            if len(chosen) == len(tasks) - 1:
                break
            if sum(counts[c] for c in chosen) >= test_fraction * len(data):
                break
            chosen.append(t)
        test_tasks = chosen
    unknown = sorted(set(test_tasks) - set(tasks))
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; known: {tasks}")
    is_test = np.isin(data.eval_names, list(test_tasks))
    if is_test.all() or not is_test.any():
        raise DataError("a task split must leave at least one task on each side")
    return data.take(np.flatnonzero(~is_test)), data.take(np.flatnonzero(is_test))
