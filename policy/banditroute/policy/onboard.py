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

import concurrent.futures
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

from banditroute.core.data import DataError, RoutingData, split_by_prompt
from banditroute.policy.identity_policy import IdentityPolicy, IdentityTrainConfig, train_identity_policy
from banditroute.policy.irt import (
    DEFAULT_QUIZ_SIZE,
    fit_new_model_identity,
    population_prior,
    select_quiz,
    select_quiz_adaptive,
)
from banditroute.policy.model_registry import ModelEntry, RegistryError, validate_name, validate_price
from banditroute.policy.reward import DEFAULT_PREFERENCE_GRID, fit_tau

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


# --- live quizzes through an upstream ------------------------------------------------------------


@runtime_checkable
class Scorer(Protocol):
    """Turns a model's answer to a quiz prompt into a score in [0, 1]."""

    def score(self, prompt: str, response: str, sample_id: str | None, raw: Mapping[str, Any]) -> float:
        """Score of ``response`` (``raw`` is the upstream's whole JSON reply)."""


def _normalise_answer(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


class ReferenceScorer:
    """1.0 when the answer matches the reference of its sample_id ('exact' after normalising
    case, punctuation and spaces; 'contains': the reference appears in the answer), else 0.0."""

    def __init__(self, references: Mapping[str, str], mode: str = "contains"):
        if mode not in ("exact", "contains"):
            raise ValueError("ReferenceScorer mode must be 'exact' or 'contains'")
        self.references = {str(k): str(v) for k, v in references.items()}
        self.mode = mode

    @classmethod
    def from_file(cls, path: str | os.PathLike, mode: str = "contains") -> "ReferenceScorer":
        frame = pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path, dtype=str, keep_default_na=False)
        missing = [c for c in ("sample_id", "reference") if c not in frame.columns]
        if missing:
            raise QuizError(f"{path}: missing column(s) {missing}; a references file needs sample_id and reference")
        return cls(dict(zip(frame["sample_id"].astype(str), frame["reference"].astype(str))), mode)

    def score(self, prompt: str, response: str, sample_id: str | None, raw: Mapping[str, Any]) -> float:
        if sample_id is None or sample_id not in self.references:
            raise QuizError(f"no reference answer for sample_id {sample_id!r}")
        ref, ans = _normalise_answer(self.references[sample_id]), _normalise_answer(response)
        if self.mode == "exact":
            return float(ans == ref)
        return float(bool(ref) and ref in ans)


class ReplayLoggedScorer:
    """The logged score the replay upstream (serve/replay.py) returns with each answer.

    For offline demos and tests only: a real upstream returns no score.
    """

    def score(self, prompt: str, response: str, sample_id: str | None, raw: Mapping[str, Any]) -> float:
        value = (raw.get("replay") or {}).get("score")
        if value is None:
            raise QuizError("the upstream reply carries no replay score (not a replay upstream, or no logged score)")
        return float(value)


class QuizRunner:
    """Asks a model its quiz through an OpenAI-compatible upstream and scores the answers.

    POST ``{base_url}/chat/completions`` with one user message per prompt
    (``max_tokens``, ``temperature`` 0), at most ``concurrency`` at a time.
    Any failed call or unscorable answer raises QuizError naming the prompt:
    a partial quiz is never used.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        scorer: Scorer,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout_s: float = 60.0,
        max_tokens: int = 512,
        concurrency: int = 4,
        client=None,
    ):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"upstream base URL must be http(s)://..., got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.scorer = scorer
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.concurrency = max(1, int(concurrency))
        self._client = client

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def ask(self, client, prompt: str) -> tuple[str, dict[str, Any]]:
        import httpx

        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        }
        try:
            resp = client.post(f"{self.base_url}/chat/completions", json=body, headers=self._headers(), timeout=self.timeout_s)
        except httpx.HTTPError as exc:
            raise QuizError(f"upstream {self.base_url} unreachable: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            raise QuizError(f"upstream answered HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            raw = resp.json()
            content = raw["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise QuizError(f"upstream reply is not an OpenAI chat completion: {resp.text[:300]}") from None
        if not isinstance(content, str):
            raise QuizError("upstream reply has no text content")
        return content, raw

    def run(self, prompts: Sequence[str], sample_ids: Sequence[str | None] | None = None) -> np.ndarray:
        """Scores in [0, 1], one per prompt (in order)."""
        import httpx

        sample_ids = list(sample_ids) if sample_ids is not None else [None] * len(prompts)
        client = self._client or httpx.Client()
        try:

            def one(i: int) -> float:
                content, raw = self.ask(client, prompts[i])
                value = float(self.scorer.score(prompts[i], content, sample_ids[i], raw))
                if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                    raise QuizError(f"scorer returned {value} for prompt {i} (must be in [0, 1])")
                return value

            with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
                return np.asarray(list(pool.map(one, range(len(prompts)))), dtype=np.float32)
        finally:
            if self._client is None:
                client.close()


# --- evaluation -------------------------------------------------------------------------------


class PolicyGridRouter:
    """Router adapter (policy/routers.py interface) for any policy with ``decide``:
    greedy decisions, mapped by model name to the test data's columns."""

    def __init__(self, policy, name: str = "policy", candidates: Sequence[str] | None = None):
        self.policy = policy
        self.name = name
        self.candidates = None if candidates is None else list(candidates)

    def fit(self, train: RoutingData, train_embeddings: np.ndarray, tau: float, seed: int) -> None:
        """Nothing to learn."""

    def choose(self, embeddings: np.ndarray, w_cost: float, test: RoutingData) -> np.ndarray:
        names = self.candidates
        if names is None:
            mask = None
        else:
            mask = self.policy.candidate_mask([names] * len(embeddings), len(embeddings))
        dec = self.policy.decide(np.asarray(embeddings, dtype=np.float32), float(w_cost), mask)
        pool = getattr(dec, "models", None) or self.policy.models
        cols = np.array([test.model_index(m) for m in pool], dtype=np.int64)
        return cols[dec.actions]


def mean_reward_over_grid(
    policy,
    test: RoutingData,
    test_embeddings: np.ndarray,
    tau: float,
    grid: Sequence[float] = DEFAULT_PREFERENCE_GRID,
    candidates: Sequence[str] | None = None,
) -> tuple[float, list[dict[str, float]]]:
    """(mean reward across ``grid``, per-preference points) of greedy routing on ``test``."""
    from banditroute.policy.evaluate import evaluate_router

    points = evaluate_router(PolicyGridRouter(policy, candidates=candidates), test, test_embeddings, grid, tau)
    return float(np.mean([p["reward"] for p in points])), points


def traffic_share(policy, embeddings: np.ndarray, test: RoutingData, model: str, grid: Sequence[float]) -> list[float]:
    """Fraction of test prompts greedily routed to ``model``, per preference of ``grid``."""
    router = PolicyGridRouter(policy)
    col = test.model_index(model)
    return [float(np.mean(router.choose(embeddings, float(w), test) == col)) for w in grid]


def run_onboard_eval(
    data: RoutingData,
    embeddings: np.ndarray,
    holdout: str,
    quiz_sizes: Sequence[int],
    config: IdentityTrainConfig,
    encoder_config,
    encoder_id: str,
    test_fraction: float = 0.2,
    seed: int = 0,
    grid: Sequence[float] = DEFAULT_PREFERENCE_GRID,
    checkpoint_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    quiz_strategy: str = "adaptive",
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train without ``holdout``, onboard it with each quiz size, compare with retraining.

    Returns (the onboard.json document, details). All variants share the
    prompt split (seeded), tau (from the training split WITHOUT the held-out
    model: what a deployed policy would have) and the evaluation grid.
    The held-out model's price is its mean logged cost per call on the
    training split; quizzes are drawn from the training split.
    """
    if holdout not in data.models:
        raise DataError(f"unknown model {holdout!r}; the data has {list(data.models)}")
    if data.n_models < 3:
        raise DataError("onboard-eval needs at least 3 models (2 left after holding one out)")
    if quiz_strategy not in QUIZ_STRATEGIES:
        raise QuizError(f"quiz strategy must be one of {list(QUIZ_STRATEGIES)}, got {quiz_strategy!r}")
    sizes = [int(n) for n in quiz_sizes]
    if not sizes or min(sizes) < MIN_QUIZ_SIZE:
        raise QuizError(f"--quiz sizes must be >= {MIN_QUIZ_SIZE}, got {sizes}")
    order = {s: i for i, s in enumerate(data.sample_ids)}
    train, test = split_by_prompt(data, test_fraction, seed)
    e_train = embeddings[[order[s] for s in train.sample_ids]]
    e_test = embeddings[[order[s] for s in test.sample_ids]]
    others = [m for m in data.models if m != holdout]
    train_wo = train.select_models(others)
    tau = fit_tau(train_wo.costs, config.tau_quantile)
    col = train.model_index(holdout)
    observed = np.flatnonzero(~np.isnan(train.scores[:, col]))
    if len(observed) < max(sizes):
        raise QuizError(f"only {len(observed)} training prompts have a score of {holdout!r}; the largest quiz needs {max(sizes)}")
    price = float(np.mean(train.costs[:, col]))
    config.seed = seed
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    log(f"training without {holdout!r} on {len(train)} prompts x {len(others)} models")
    policy_wo, _, hist_wo = train_identity_policy(train_wo, e_train, config, encoder_config, encoder_id, tau=tau)
    timings["train_without_s"] = time.perf_counter() - t0
    without_reward, without_points = mean_reward_over_grid(policy_wo, test, e_test, tau, grid)
    log(f"without {holdout!r}: mean reward {without_reward:.4f}")
    if checkpoint_dir is not None:
        policy_wo.save(Path(checkpoint_dir) / "without")

    rows, details_rows = [], []
    base_registry = policy_wo.registry.copy()
    for n in sizes:
        t0 = time.perf_counter()
        policy_wo.registry = base_registry.copy()
        if quiz_strategy == "adaptive":
            entry, quiz, _ = onboard_model_adaptive(
                policy_wo, holdout, price, e_train[observed], lambda ix: train.scores[observed[ix], col], n, seed=seed
            )
        else:
            quiz = choose_quiz(policy_wo, e_train[observed], n, quiz_strategy, seed)
            entry = onboard_model(policy_wo, holdout, price, e_train[observed[quiz]], train.scores[observed[quiz], col])
        rows_q = observed[quiz]
        reward_n, points_n = mean_reward_over_grid(policy_wo, test, e_test, tau, grid)
        share = traffic_share(policy_wo, e_test, test, holdout, grid)
        rows.append({"quiz": n, "mean_reward": reward_n})
        details_rows.append(
            {
                "quiz": n,
                "mean_reward": reward_n,
                "points": points_n,
                "identity_mu": entry.mu,
                "identity_sigma": entry.sigma,
                "quiz_mean_score": float(np.mean(train.scores[rows_q, col])),
                "traffic_share_by_w": share,
                "seconds": time.perf_counter() - t0,
            }
        )
        log(f"onboarded {holdout!r} with {n} quiz prompts: mean reward {reward_n:.4f}")
    policy_wo.registry = base_registry

    t0 = time.perf_counter()
    log(f"retraining with {holdout!r} from the start")
    policy_all, _, hist_all = train_identity_policy(train, e_train, config, encoder_config, encoder_id, tau=tau)
    timings["train_with_s"] = time.perf_counter() - t0
    retrained_reward, retrained_points = mean_reward_over_grid(policy_all, test, e_test, tau, grid)
    log(f"retrained with {holdout!r}: mean reward {retrained_reward:.4f}")
    if checkpoint_dir is not None:
        policy_all.save(Path(checkpoint_dir) / "retrained")
    full_mu, full_sigma = policy_all.registry.get(holdout).mu, policy_all.registry.get(holdout).sigma
    retrained_share = traffic_share(policy_all, e_test, test, holdout, grid)

    doc = {
        "model": holdout,
        "rows": rows,
        "retrained_mean_reward": retrained_reward,
        "without_model_mean_reward": without_reward,
    }
    details = {
        **doc,
        "data": data.source,
        "n_train": len(train),
        "n_test": len(test),
        "tau": tau,
        "price_usd_per_call": price,
        "grid": [float(w) for w in grid],
        "seed": seed,
        "test_fraction": test_fraction,
        "quiz_strategy": quiz_strategy,
        "rows": details_rows,
        "retrained_points": retrained_points,
        "without_points": without_points,
        "retrained_identity": {"mu": full_mu, "sigma": full_sigma},
        "retrained_traffic_share_by_w": retrained_share,
        "timings_s": timings,
        "final_train_reward": {"without": hist_wo[-1]["mean_reward"], "retrained": hist_all[-1]["mean_reward"]},
    }
    return doc, details


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
