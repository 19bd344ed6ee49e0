"""Live quizzes: ask a new model the quiz prompts through an upstream and score its answers.

A :class:`Scorer` turns an answer into a score in [0, 1] (:class:`ReferenceScorer`
against reference answers, :class:`ReplayLoggedScorer` for the replay
upstream's logged scores); :class:`QuizRunner` sends the prompts and collects
the scores as :class:`QuizResults`.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd
from banditroute.policy.onboard import QuizError


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
