"""Onboarding a new model into an identity policy, and measuring how well it works.

Onboarding = pick the N most informative quiz prompts (``irt.select_quiz``),
get the new model's scores on them (a results file, a column of routing
data, or live calls through its upstream + a scorer), fit ONLY the new
model's identity posterior with the IRT item maps frozen, and register it
with its price. The policy's weights do not change; the model is routable
at the next decision.

Everything is validated before anything is registered: a bad file, an
unknown name, a bad price or a failed fit leaves the registry untouched.

:func:`run_onboard_eval` is the honest test of the whole idea: train
without model X, onboard X from 10/20/50 quiz prompts, and compare mean
reward over the preference grid with a policy trained with X from the start
(and with the policy that never gets X), on held-out prompts.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from banditroute.core.data import RoutingData
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.irt import DEFAULT_QUIZ_SIZE, fit_new_model_identity, population_prior
from banditroute.policy.quiz import select_quiz, select_quiz_adaptive
from banditroute.policy.model_registry import ModelEntry, RegistryError, validate_name, validate_price

MIN_QUIZ_SIZE = 5
"""Fewer scored prompts than this cannot say anything useful about a model."""


class QuizError(ValueError):
    """Quiz results are missing, malformed or too few (nothing was registered)."""


# --- quiz results files ----------------------------------------------------------------------


@dataclass
class QuizResults:
    """Validated scores of one model on quiz prompts."""

    prompts: list[str]
    """Prompt text per row."""
    scores: np.ndarray
    """Score per row, in [0, 1], shape (n,)."""
    sample_ids: list[str | None]
    """sample_id per row when known."""
    source: str = ""
    """Where the results came from."""

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, rows: Sequence[int]) -> "QuizResults":
        rows = list(rows)
        return QuizResults(
            [self.prompts[i] for i in rows], self.scores[np.asarray(rows, dtype=np.int64)], [self.sample_ids[i] for i in rows], self.source
        )


def read_quiz_results(
    path: str | os.PathLike, data: RoutingData | None = None, model: str | None = None
) -> QuizResults:
    """Read and validate a results file (.csv or .parquet).

    Columns: ``score`` (in [0, 1]) and ``prompt`` or ``sample_id`` (a
    ``sample_id`` without ``prompt`` is resolved against ``data``). An
    optional ``model`` column must name ``model`` on every row. Errors name
    the file, the row (1-based, header excluded) and the problem.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such quiz results file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            raise QuizError(f"{where}: unsupported quiz file type {suffix!r}; use .csv or .parquet")
    except QuizError:
        raise
    except Exception as exc:  # pandas/pyarrow parse errors
        raise QuizError(f"{where}: cannot read quiz results ({type(exc).__name__}: {exc})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    if "score" not in frame.columns:
        raise QuizError(f"{where}: missing column 'score' (have {list(frame.columns)})")
    if "prompt" not in frame.columns and "sample_id" not in frame.columns:
        raise QuizError(f"{where}: needs a 'prompt' or a 'sample_id' column (have {list(frame.columns)})")
    if len(frame) == 0:
        raise QuizError(f"{where}: no rows")
    if "sample_id" in frame.columns and "prompt" not in frame.columns and data is None:
        raise QuizError(f"{where}: rows name only sample_id; pass the routing data (--data) to look up their prompts")

    by_id = {str(s): i for i, s in enumerate(data.sample_ids)} if data is not None else {}
    prompts: list[str] = []
    scores: list[float] = []
    ids: list[str | None] = []
    seen: set[str] = set()
    for i, row in enumerate(frame.to_dict("records"), start=1):
        if model is not None and "model" in frame.columns:
            named = str(row["model"]).strip()
            if named and named != model:
                raise QuizError(f"{where}: row {i}: results of model {named!r}, expected {model!r}")
        raw = row["score"]
        if raw is None or (isinstance(raw, str) and not raw.strip()) or (isinstance(raw, float) and math.isnan(raw)):
            raise QuizError(f"{where}: row {i}: missing score")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise QuizError(f"{where}: row {i}: score {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise QuizError(f"{where}: row {i}: score {raw!r} is not a finite number")
        if not 0.0 <= value <= 1.0:
            raise QuizError(f"{where}: row {i}: score {value} outside [0, 1]")
        sid = None
        if "sample_id" in frame.columns and row["sample_id"] is not None and str(row["sample_id"]).strip():
            sid = str(row["sample_id"]).strip()
        prompt = row.get("prompt") if "prompt" in frame.columns else None
        if prompt is None or (isinstance(prompt, float) and math.isnan(prompt)) or (isinstance(prompt, str) and not prompt.strip()):
            if sid is None:
                raise QuizError(f"{where}: row {i}: neither a prompt nor a sample_id")
            if sid not in by_id:
                raise QuizError(f"{where}: row {i}: unknown sample_id {sid!r} (not in {data.source or 'the routing data'})")
            prompt = data.prompts[by_id[sid]]
        elif not isinstance(prompt, str):
            raise QuizError(f"{where}: row {i}: prompt must be text")
        key = sid if sid is not None else prompt
        if key in seen:
            raise QuizError(f"{where}: row {i}: duplicate {'sample_id ' + repr(sid) if sid is not None else 'prompt'}")
        seen.add(key)
        prompts.append(prompt)
        scores.append(value)
        ids.append(sid)
    return QuizResults(prompts, np.asarray(scores, dtype=np.float32), ids, where)


def quiz_results_from_data(data: RoutingData, model: str) -> QuizResults:
    """The rows of ``data`` where ``model`` has a recorded score (its column of the wide layout)."""
    if model not in data.models:
        raise QuizError(f"{data.source or 'routing data'}: unknown model {model!r}; the data has {list(data.models)}")
    col = data.model_index(model)
    rows = np.flatnonzero(~np.isnan(data.scores[:, col]))
    return QuizResults(
        [data.prompts[i] for i in rows], data.scores[rows, col].astype(np.float32), [str(data.sample_ids[i]) for i in rows], data.source
    )


def check_quiz_size(n: int, available: int, where: str = "quiz") -> None:
    if n < MIN_QUIZ_SIZE:
        raise QuizError(f"--quiz must be >= {MIN_QUIZ_SIZE}, got {n}")
    if available < n:
        raise QuizError(f"{where}: too few rows: {available} usable scored prompt(s), the quiz needs {n} (lower --quiz or add rows)")


# --- onboarding ----------------------------------------------------------------------------------


def choose_quiz(
    policy: IdentityPolicy, embeddings: np.ndarray, n: int = DEFAULT_QUIZ_SIZE, strategy: str = "stratified", seed: int = 0
) -> np.ndarray:
    """Indices of a FIXED quiz of ``n`` prompts among ``embeddings`` for a new model of this pool
    (``irt.select_quiz``: by default one per k-means stratum, most informative first)."""
    _, mu, sigma, _ = policy.registry.snapshot()
    prior = _new_model_prior(policy, "")
    prior_std = float(np.mean(prior[1])) if prior is not None else policy.meta.irt.prior_std
    return select_quiz(policy.item_maps, embeddings, n, mu, sigma, prior_std=prior_std, strategy=strategy, seed=seed)


def _check_new_model(policy: IdentityPolicy, name: str, price: float, replace: bool) -> float:
    validate_name(name)
    price = validate_price(name, price)
    if name in policy.registry and not replace:
        raise RegistryError(f"model {name!r} is already registered (pass replace to re-onboard it)")
    return price


def _new_model_prior(policy: IdentityPolicy, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Population prior of the OTHER routable models (a re-onboarded model is not its own prior)."""
    others = [m for m in policy.registry.models if m != name]
    if len(others) < 2:
        return None
    _, mu, sigma, _ = policy.registry.snapshot(others)
    return population_prior(mu, sigma)


QUIZ_STRATEGIES = ("adaptive", "stratified", "information", "random")
"""'adaptive' asks in batches and refits (needs the answers as it goes); the others fix the quiz up front."""


def onboard_model_adaptive(
    policy: IdentityPolicy,
    name: str,
    price: float,
    pool_embeddings: np.ndarray,
    answer: Callable[[np.ndarray], np.ndarray],
    n: int = DEFAULT_QUIZ_SIZE,
    replace: bool = False,
    seed: int = 0,
) -> tuple[ModelEntry, np.ndarray, np.ndarray]:
    """Onboard with an ADAPTIVE quiz over ``pool_embeddings`` (``irt.select_quiz_adaptive``).

    ``answer(indices) -> scores`` is asked only for the prompts chosen,
    batch by batch. Returns (the registered entry, quiz indices, their scores).
    """
    price = _check_new_model(policy, name, price, replace)
    if n < MIN_QUIZ_SIZE:
        raise QuizError(f"--quiz must be >= {MIN_QUIZ_SIZE}, got {n}")
    if pool_embeddings.shape[1] != policy.meta.embed_dim:
        raise QuizError(f"quiz embeddings of width {pool_embeddings.shape[1]}, the policy expects {policy.meta.embed_dim}")
    _, mu_pop, sg_pop, _ = policy.registry.snapshot([m for m in policy.registry.models if m != name])

    def checked(indices: np.ndarray) -> np.ndarray:
        got = np.asarray(answer(indices), dtype=np.float32).reshape(-1)
        if np.isnan(got).any() or (got < 0).any() or (got > 1).any():
            raise QuizError("quiz scores must be numbers in [0, 1]")
        return got

    idx, scores, mu, sigma = select_quiz_adaptive(
        policy.item_maps, pool_embeddings, checked, n, mu_pop, sg_pop, prior=_new_model_prior(policy, name),
        config=policy.meta.irt, seed=seed,
    )
    entry = policy.registry.add(name, price, mu, sigma, n_observations=len(idx), source="quiz", replace=replace)
    return entry, idx, scores


def onboard_model(
    policy: IdentityPolicy,
    name: str,
    price: float,
    quiz_embeddings: np.ndarray,
    quiz_scores: np.ndarray,
    replace: bool = False,
) -> ModelEntry:
    """Fit ``name``'s identity from a given quiz and register it (all checks first; atomic)."""
    price = _check_new_model(policy, name, price, replace)
    quiz_scores = np.asarray(quiz_scores, dtype=np.float32).reshape(-1)
    if len(quiz_scores) != len(quiz_embeddings):
        raise QuizError(f"{len(quiz_scores)} quiz scores for {len(quiz_embeddings)} prompts")
    if len(quiz_scores) < MIN_QUIZ_SIZE:
        raise QuizError(f"too few quiz rows: {len(quiz_scores)} (need >= {MIN_QUIZ_SIZE})")
    if np.isnan(quiz_scores).any() or (quiz_scores < 0).any() or (quiz_scores > 1).any():
        raise QuizError("quiz scores must be numbers in [0, 1]")
    if quiz_embeddings.shape[1] != policy.meta.embed_dim:
        raise QuizError(f"quiz embeddings of width {quiz_embeddings.shape[1]}, the policy expects {policy.meta.embed_dim}")
    mu, sigma = fit_new_model_identity(
        policy.item_maps, quiz_embeddings, quiz_scores, policy.meta.irt, prior=_new_model_prior(policy, name)
    )
    return policy.registry.add(name, price, mu, sigma, n_observations=len(quiz_scores), source="quiz", replace=replace)


# --- writing checkpoints atomically ------------------------------------------------------------


def save_policy_atomically(policy: IdentityPolicy, out: str | os.PathLike) -> Path:
    """Write a full checkpoint to ``out`` via a sibling temp folder + rename (no half checkpoint)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        policy.save(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if policy.registry.path is not None and Path(policy.registry.path).parent == tmp:
        policy.registry.path = str(out / Path(policy.registry.path).name)
    return out
