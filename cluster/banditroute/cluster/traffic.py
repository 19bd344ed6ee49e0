"""The replay traffic driver of `banditroute up`: a real async HTTP client on loopback.

It sends prompts from the routing data with random preferences (w_cost ~
U[0, 1]) to ``/v1/route`` in explore mode, then posts the LOGGED outcome of
the model the router chose (its score and cost in the data) to
``/v1/feedback``. The running reward uses the starting policy's tau
throughout, so the curve is comparable from start to end; each decision's
request (data row, w_cost) is kept, so every single model can be scored on
the same requests (cluster/summary.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from typing import Any, Awaitable, Callable

import numpy as np


class TrafficState:
    """What the driver has done so far (read by the progress view and the summary)."""

    def __init__(self, models: list[str], window: int):
        self.models = models
        self.window = window
        self.decisions = 0
        self.claimed = 0
        self.rewards_acknowledged = 0
        self.feedback_status: Counter[str] = Counter()
        self.route_errors = 0
        self.feedback_errors = 0
        self.last_error: str | None = None
        self.rewards: list[float] = []
        self.chosen: list[int] = []
        self.versions: list[int] = []
        """Per decision: the policy version that answered it."""
        self.rows: list[int] = []
        """Per decision: the data row (prompt) it routed, so fixed models can be scored on the same requests."""
        self.w_costs: list[float] = []
        """Per decision: the w_cost preference it was sent with."""
        self.times: list[float] = []
        """Per decision: wall-clock time it was answered (places the learner's gate checks on the decision axis)."""
        self.costs: list[float] = []
        """Per decision: the USD the driver charged for it (the data's cost, times a scenario's price factor)."""
        self.reward_curve: list[list[float]] = []
        self.route_ms: list[float] = []
        self.feedback_ms: list[float] = []
        self._recent: deque[float] = deque(maxlen=window)
        self._recent_sum = 0.0
        self.started = time.monotonic()

    def record(self, reward: float, model_index: int, version: int, row: int, w_cost: float, cost: float = float("nan")) -> None:
        if len(self._recent) == self._recent.maxlen:
            self._recent_sum -= self._recent[0]
        self._recent.append(reward)
        self._recent_sum += reward
        self.decisions += 1
        self.rewards.append(reward)
        self.chosen.append(model_index)
        self.versions.append(version)
        self.rows.append(row)
        self.w_costs.append(w_cost)
        self.times.append(time.time())
        self.costs.append(cost)

    @property
    def running_reward(self) -> float:
        return self._recent_sum / len(self._recent) if self._recent else float("nan")

    def curve_point(self) -> None:
        if self.decisions and (not self.reward_curve or self.reward_curve[-1][0] != self.decisions):
            self.reward_curve.append([self.decisions, round(self.running_reward, 6)])

    def share(self, last: int) -> dict[str, float]:
        recent = self.chosen[-last:]
        if not recent:
            return {}
        counts = Counter(recent)
        return {self.models[k]: counts[k] / len(recent) for k in sorted(counts, key=lambda k: -counts[k])}


async def drive_traffic(
    base_url: str,
    data,
    tau: float,
    pool: list[str],
    state: TrafficState,
    max_decisions: int,
    concurrency: int,
    seed: int,
    max_error_fraction: float,
    stop: asyncio.Event,
    *,
    post_feedback: bool = True,
    price_factors: dict[str, float] | None = None,
    before_request: Callable[[Any], Awaitable[None]] | None = None,
) -> None:
    """Route random prompts (explore, random preference), post each chosen model's logged outcome.

    Scenario runs (cluster/scenario_run.py): ``post_feedback`` False for a router that takes none
    (frozen); ``price_factors`` {model: x} multiplies the logged cost the driver charges (read at each
    decision: a price event changes it); ``before_request(client)`` is awaited before each request
    is claimed (scripted events; it may block every worker while it changes the pool).
    """
    import httpx

    from banditroute.policy.reward import reward

    rng = np.random.default_rng(seed)
    data_index = {m: k for k, m in enumerate(data.models)}
    candidates = [m for m in pool if m in data_index]
    send_candidates = sorted(candidates) != sorted(pool)
    scores, costs = data.scores_filled, data.costs
    curve_every = max(1, (max_decisions or 10_000) // 400)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)

    def too_many_errors() -> bool:
        errors = state.route_errors + state.feedback_errors
        return errors >= 50 and errors > max_error_fraction * max(1, state.decisions + errors)

    async with httpx.AsyncClient(base_url=base_url, timeout=60.0, limits=limits, trust_env=False) as client:

        async def worker() -> None:
            while not stop.is_set() and (max_decisions == 0 or state.claimed < max_decisions):
                if before_request is not None:
                    await before_request(client)
                    if max_decisions and state.claimed >= max_decisions:
                        break
                state.claimed += 1
                row = int(rng.integers(len(data)))
                w = float(rng.uniform(0.0, 1.0))
                body: dict[str, Any] = {"prompt": data.prompts[row], "preference": {"quality": 1.0 - w, "cost": w}, "mode": "explore"}
                if send_candidates:
                    body["candidates"] = candidates
                t0 = time.perf_counter()
                error = None
                try:
                    resp = await client.post("/v1/route", json=body)
                    decision = resp.json()
                except (httpx.HTTPError, ValueError) as exc:
                    error = f"route: {type(exc).__name__}: {exc}"
                else:
                    if resp.status_code != 200:
                        error = f"route: HTTP {resp.status_code}: {resp.text[:200]}"
                if error is not None:
                    state.claimed -= 1
                    state.route_errors += 1
                    state.last_error = error
                    await asyncio.sleep(0.1)
                    if too_many_errors():
                        stop.set()
                    continue
                state.route_ms.append((time.perf_counter() - t0) * 1000.0)
                k = data_index[decision["model"]]
                score, cost = float(scores[row, k]), float(costs[row, k]) * (price_factors or {}).get(decision["model"], 1.0)
                state.record(float(reward(score, cost, w, tau)), k, int(decision.get("policy_version", -1)), row, w, cost)
                if state.decisions % curve_every == 0:
                    state.curve_point()
                if not post_feedback:
                    continue
                t0 = time.perf_counter()
                try:
                    fb = await client.post("/v1/feedback", json={"decision_id": decision["decision_id"], "score": score, "cost": cost})
                    # 409 = "duplicate": the decision was already rewarded; idempotent, not an error.
                    status = fb.json().get("status", f"http-{fb.status_code}") if fb.status_code in (200, 409) else f"http-{fb.status_code}"
                except (httpx.HTTPError, ValueError) as exc:
                    status = type(exc).__name__
                state.feedback_ms.append((time.perf_counter() - t0) * 1000.0)
                state.feedback_status[status] += 1
                if status == "accepted":
                    state.rewards_acknowledged += 1
                elif status != "duplicate":
                    state.feedback_errors += 1
                    state.last_error = f"feedback: {status}"
                    if too_many_errors():
                        stop.set()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    state.curve_point()
