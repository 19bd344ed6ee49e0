"""The pool admin API: add, remove and reprice models of a running identity-policy deployment.

Mounted by the ingress under the admin key group (serve/admin.py):

- ``GET /v1/admin/models``: the pool, prices, and the registry version.
- ``POST /v1/admin/models``: add a model. ``{"name", "price", ...}`` plus ONE of
  * ``"quiz": [{"prompt": str, "score": 0..1}, ...]`` (>= 5 answers; with
    ``"quiz_size": N`` the N most informative rows are chosen adaptively and
    only those are used, as ``banditroute onboard --scores``),
  * ``"upstream": {"base_url", "prompts": [{"prompt", "sample_id"?}], "quiz_size",
    "scorer": "replay" | "reference", "references": {sample_id: answer}, "api_key_env"?}``:
    the quiz is asked live through the model's OpenAI-compatible upstream
    (``policy.quiz_runner.QuizRunner``; any failed call fails the whole add),
  * ``"identity": {"mu": [...], "sigma": [...], "n_observations": N}``: an identity fitted elsewhere,
  and ``"replace": true`` to re-onboard a registered name.
- ``PATCH /v1/admin/models/{name}``: ``{"price": USD per call}``.
- ``DELETE /v1/admin/models/{name}``: retire it (kept in the document; re-add with replace).

Every change is validated first (a 4xx naming the field: ``name``, ``price``,
``quiz[3].score``, ...; nothing changed), then written through storage as ONE
new registry document with ``version`` + 1. Replicas re-read the document
every ``identity_policy.DEFAULT_REGISTRY_REFRESH_S`` (0.5 s) while routing,
so the change is served within a second, and each decision records the
registry version it was made with (``DecisionRecord.registry_version``).
Before each change this ingress re-reads the stored document, so changes made
through other ingress replicas are kept; two changes sent at the same instant
through two replicas can still race (last writer wins): send pool changes
through one client.

Only the identity policy has a pool that can change: BaRP and value
policies have one output head per model fixed at training time, so every
route here answers 409 (field ``policy``) for them and for weights that come
from the parameter server (the online learner trains BaRP only).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from banditroute.serve.protocol import RequestError

MAX_QUIZ_ROWS = 2000
MAX_NAME_CHARS = 200
FIXED_POOL = ("the served policy kind {kind!r} has a fixed pool (one output head per model, set when it was trained); "
              "adding, removing or repricing models needs an identity policy (`banditroute train --kind identity`)")


# --- parsing (pure: RequestError naming the field) ----------------------------------------------


def _number(value: Any, field: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise RequestError(422, field, f"{field} must be a finite number, got {value!r}"[:300])
    value = float(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(422, field, f"{field} must be in [{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def parse_price(body: Any, field: str = "price") -> float:
    """USD per call: a finite number >= 0."""
    if not isinstance(body, dict) or field not in body:
        raise RequestError(422, field, f"{field} (USD per call) is required")
    return _number(body[field], field, 0.0)


def parse_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > MAX_NAME_CHARS or "|" in name:
        raise RequestError(422, field, f"{field} must be a non-empty model name without surrounding spaces or '|'")
    return name


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(422, field, f"{field} must be an integer in [{low}, {high}], got {value!r}"[:300])
    return value


def parse_quiz(rows: Any, field: str = "quiz", min_rows: int = 5) -> tuple[list[str], np.ndarray]:
    """``[{"prompt": str, "score": 0..1}, ...]`` -> (prompts, scores); errors name ``quiz[i].<key>``."""
    if not isinstance(rows, list) or not min_rows <= len(rows) <= MAX_QUIZ_ROWS:
        raise RequestError(422, field, f"{field} must be a list of {min_rows}..{MAX_QUIZ_ROWS} answers "
                                       '{"prompt": str, "score": 0..1}')
    prompts, scores, seen = [], [], set()
    for i, row in enumerate(rows):
        where = f"{field}[{i}]"
        if not isinstance(row, dict) or set(row) - {"prompt", "score", "sample_id"}:
            raise RequestError(422, where, f'{where} must be {{"prompt": str, "score": 0..1}}')
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError(422, f"{where}.prompt", f"{where}.prompt must be a non-empty string")
        if prompt in seen:
            raise RequestError(422, f"{where}.prompt", f"{where}.prompt repeats an earlier quiz prompt")
        seen.add(prompt)
        prompts.append(prompt)
        scores.append(_number(row.get("score"), f"{where}.score", 0.0, 1.0))
    return prompts, np.asarray(scores, dtype=np.float32)


def parse_identity(raw: Any, dim: int) -> tuple[list[float], list[float], int]:
    if not isinstance(raw, dict) or set(raw) - {"mu", "sigma", "n_observations"}:
        raise RequestError(422, "identity", 'identity must be {"mu": [...], "sigma": [...], "n_observations": N}')
    out = []
    for key, low in (("mu", None), ("sigma", 1e-6)):
        values = raw.get(key)
        if not isinstance(values, list) or len(values) != dim:
            raise RequestError(422, f"identity.{key}", f"identity.{key} must be a list of {dim} numbers")
        out.append([_number(v, f"identity.{key}[{j}]", low) for j, v in enumerate(values)])
    n = _int(raw.get("n_observations", 0), "identity.n_observations", 0, 10**9)
    return out[0], out[1], n


# --- the API --------------------------------------------------------------------------------------


class PoolAdmin:
    """Pool changes on the registry of the identity checkpoint ``policy_location`` (router.policy).

    The checkpoint (weights for the IRT item maps, the registry) and its
    encoder are loaded on first use. ``quiz_runner`` builds the
    ``QuizRunner`` of an upstream quiz (tests inject a fake upstream).
    """

    def __init__(self, policy_location: str | None, quiz_runner: Callable[..., Any] | None = None):
        self.policy_location = policy_location
        self._quiz_runner = quiz_runner
        self._policy = None
        self._encoder = None
        self._lock = asyncio.Lock()

    # -- what is served --

    def _kind(self) -> str:
        if self.policy_location is None:
            raise RequestError(409, "policy", "the replicas take their weights from the parameter server (the online "
                               "learner, BaRP only): " + FIXED_POOL.format(kind="barp"))
        meta = json.loads((Path(self.policy_location) / "meta.json").read_text())
        return str(meta.get("kind", "barp"))

    def _load(self):
        """The identity policy (registry re-read from storage) and its encoder; 409 for fixed-pool kinds."""
        if self._policy is None:
            kind = self._kind()
            if kind != "identity":
                raise RequestError(409, "policy", FIXED_POOL.format(kind=kind))
            from banditroute.policy.encoders import make_encoder
            from banditroute.policy.identity_policy import IdentityPolicy

            self._policy = IdentityPolicy.load(self.policy_location, registry_refresh_s=None)
            self._encoder = make_encoder(self._policy.encoder)
        self._policy.registry.refresh()  # another ingress replica may have changed it
        return self._policy

    def _embed(self, prompts: list[str]) -> np.ndarray:
        return np.asarray(self._encoder.encode(list(prompts)), dtype=np.float32)

    async def _run(self, work: Callable[[], Any]) -> Any:
        async with self._lock:  # one change at a time per ingress; the work itself off the event loop
            return await asyncio.to_thread(work)

    # -- endpoints --

    async def list(self) -> dict[str, Any]:
        return await self._run(lambda: self._describe(self._load()))

    def _describe(self, policy) -> dict[str, Any]:
        from banditroute.policy.fresh_models import fresh_columns

        view = policy.registry.view()
        fresh = fresh_columns(view.n_observations, policy.meta.fresh_models)
        models = [{"name": n, "price": float(p), "n_observations": int(o), "fresh": f,
                   "source": policy.registry.get(n).source} for n, p, o, f in zip(view.names, view.price, view.n_observations, fresh)]
        return {"registry_version": view.version, "models": models}

    async def add(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise RequestError(422, "body", "the body must be a JSON object")
        unknown = set(body) - {"name", "price", "quiz", "quiz_size", "upstream", "identity", "replace"}
        if unknown:
            field = sorted(unknown)[0]
            raise RequestError(422, field, f"unknown field {field!r}")
        name = parse_name(body.get("name"))
        price = parse_price(body)
        sources = [k for k in ("quiz", "upstream", "identity") if k in body]
        if len(sources) != 1:
            raise RequestError(422, "quiz", 'give exactly one of "quiz" (answers), "upstream" (ask it live) or "identity"')
        replace = body.get("replace", False)
        if not isinstance(replace, bool):
            raise RequestError(422, "replace", "replace must be true or false")
        quiz = parse_quiz(body["quiz"]) if "quiz" in body else None
        quiz_size = None
        if "quiz_size" in body:
            limit = len(quiz[0]) if quiz is not None else MAX_QUIZ_ROWS
            quiz_size = _int(body["quiz_size"], "quiz_size", 5, limit)

        def work() -> dict[str, Any]:
            policy = self._load()
            if name in policy.registry and not replace:
                raise RequestError(409, "name", f"model {name!r} is already in the pool; send \"replace\": true to re-onboard it")
            if "identity" in body:
                mu, sigma, n_obs = parse_identity(body["identity"], policy.registry.dim)
                entry = policy.registry.add(name, price, mu, sigma, n_observations=n_obs, source="quiz", replace=replace)
            elif quiz is not None:
                entry = self._onboard_from_answers(policy, name, price, quiz[0], quiz[1], quiz_size, replace)
            else:
                entry = self._onboard_from_upstream(policy, name, price, body["upstream"], replace)
            return {"model": entry.name, "price": entry.price, "n_observations": entry.n_observations,
                    "identity": {"mu": entry.mu, "sigma": entry.sigma}, "registry_version": policy.registry.version}

        return await self._run(work)

    def _onboard_from_answers(self, policy, name, price, prompts, scores, quiz_size, replace):
        from banditroute.policy.onboard import QuizError, onboard_model, onboard_model_adaptive

        emb = self._embed(prompts)
        try:
            if quiz_size is not None and quiz_size < len(prompts):
                return onboard_model_adaptive(policy, name, price, emb, lambda idx: scores[np.asarray(idx)], quiz_size,
                                              replace=replace)[0]
            return onboard_model(policy, name, price, emb, scores, replace=replace)
        except QuizError as exc:
            raise RequestError(422, "quiz", str(exc)) from None

    def _onboard_from_upstream(self, policy, name, price, raw: Any, replace: bool):
        from banditroute.policy.onboard import QuizError, onboard_model
        from banditroute.policy.quiz_runner import QuizRunner, ReferenceScorer, ReplayLoggedScorer

        if not isinstance(raw, dict) or not isinstance(raw.get("base_url"), str) or not raw["base_url"].startswith(("http://", "https://")):
            raise RequestError(422, "upstream.base_url", "upstream.base_url must be an http(s):// URL of an OpenAI-compatible API")
        rows = raw.get("prompts")
        if not isinstance(rows, list) or not 5 <= len(rows) <= MAX_QUIZ_ROWS or not all(
                isinstance(r, dict) and isinstance(r.get("prompt"), str) and r["prompt"].strip() for r in rows):
            raise RequestError(422, "upstream.prompts", 'upstream.prompts must be 5.. {"prompt": str, "sample_id"?} to choose the quiz from')
        size = _int(raw.get("quiz_size", min(30, len(rows))), "upstream.quiz_size", 5, len(rows))
        scorer_name = raw.get("scorer", "reference")
        if scorer_name == "replay":
            scorer = ReplayLoggedScorer()
        elif scorer_name == "reference" and isinstance(raw.get("references"), dict) and raw["references"]:
            scorer = ReferenceScorer({str(k): str(v) for k, v in raw["references"].items()})
        else:
            raise RequestError(422, "upstream.scorer", 'upstream.scorer must be "replay", or "reference" with upstream.references {sample_id: answer}')
        from banditroute.policy.onboard import choose_quiz

        emb = self._embed([r["prompt"] for r in rows])
        chosen = choose_quiz(policy, emb, size)
        make = self._quiz_runner or QuizRunner
        runner = make(raw["base_url"], name, scorer, api_key_env=raw.get("api_key_env"))
        try:
            scores = runner.run([rows[i]["prompt"] for i in chosen], [rows[i].get("sample_id") for i in chosen])
            return onboard_model(policy, name, price, emb[chosen], scores, replace=replace)
        except QuizError as exc:
            raise RequestError(502, "upstream", f"the quiz through the upstream failed: {exc}"[:500]) from None

    async def set_price(self, name: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) - {"price"}:
            raise RequestError(422, "price", 'the body must be {"price": USD per call}')
        price = parse_price(body)

        def work() -> dict[str, Any]:
            policy = self._load()
            self._known(policy, name)
            before = policy.registry.get(name).price
            policy.registry.set_price(name, price)
            return {"model": name, "price": price, "price_before": before, "registry_version": policy.registry.version}

        return await self._run(work)

    async def remove(self, name: str) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            policy = self._load()
            self._known(policy, name)
            if len(policy.registry.models) == 1:
                raise RequestError(409, "name", f"model {name!r} is the last one in the pool; add another first")
            policy.registry.retire(name)
            return {"removed": name, "registry_version": policy.registry.version}

        return await self._run(work)

    @staticmethod
    def _known(policy, name: str) -> None:
        if name not in policy.registry:
            raise RequestError(404, "name", f"unknown model {name!r}; the pool: {policy.registry.models}"[:500])
