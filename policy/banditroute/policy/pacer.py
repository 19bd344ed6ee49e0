"""Budget mode: a pacer that turns the cost-weight dial so that spend tracks a target.

An operator sets a spend target (USD per 1,000 requests, or USD per hour);
the router keeps maximising quality under the preference w_cost the pacer
chooses. The pacer is a PI controller on the log-ratio of measured to
target spend, acting on logit(w_cost):

    e_t = log(measured_rate_t / target)                  (scale-free, symmetric)
    I_t = clip(I_{t-1} + e_t, anti-windup bounds)
    w_t = sigmoid(logit(w_init) + kp * e_t + ki * I_t),   clipped to [w_min, w_max]

Over-spending (e > 0) raises w_cost (cheaper models), under-spending lowers
it (better models). The integral term removes the steady-state error, so
the CUMULATIVE spend converges to the target; the logit/log parametrisation
makes the same gains work for any price scale. Measured rate: the spend of
the last ``window`` requests, per 1k requests or per hour (from the
requests' timestamps), smoothed with an EMA. Working in the policy's own
w_cost means the pacer needs nothing from the policy but its decisions' cost:
it works with any policy (BaRP or identity) and any pool.

:func:`pacer_update` is the pure controller step; :class:`BudgetPacer` keeps
the state and the window; :func:`replay_with_pacer` replays logged prompts
through a trained policy with the pacer in the loop (``python -m
banditroute.policy.pacer --help``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

UNITS = ("per_1k_requests", "per_hour")


@dataclass
class PacerConfig:
    """Budget pacing of the cost weight."""

    target: float = 1.0
    """Spend target in USD per ``unit``."""
    unit: Literal["per_1k_requests", "per_hour"] = "per_1k_requests"
    """What the target counts: USD per 1,000 requests, or USD per hour of traffic."""
    window: int = 50
    """Requests per controller update (the measured spend is over the latest window)."""
    kp: float = 0.3
    """Proportional gain on the log spend error (logit units)."""
    ki: float = 0.3
    """Integral gain on the summed log spend error (logit units per update)."""
    ema: float = 0.5
    """Weight of the newest window in the smoothed spend rate (1 = no smoothing)."""
    w_init: float = 0.3
    """w_cost before the first update."""
    w_min: float = 0.0
    """Lowest w_cost the pacer may choose."""
    w_max: float = 0.99
    """Highest w_cost the pacer may choose."""

    def validate(self) -> None:
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"pacer.target must be a positive number of USD, got {self.target}")
        if self.unit not in UNITS:
            raise ValueError(f"pacer.unit must be one of {list(UNITS)}, got {self.unit!r}")
        if self.window < 1:
            raise ValueError("pacer.window must be >= 1")
        if self.kp < 0 or self.ki < 0:
            raise ValueError("pacer.kp and pacer.ki must be >= 0")
        if not 0 < self.ema <= 1:
            raise ValueError("pacer.ema must be in (0, 1]")
        if not 0 <= self.w_min < self.w_max <= 1:
            raise ValueError("pacer: need 0 <= w_min < w_max <= 1")
        if not self.w_min <= self.w_init <= self.w_max:
            raise ValueError("pacer.w_init must lie in [w_min, w_max]")


@dataclass
class PacerState:
    """Controller state (plain numbers: checkpointable, shareable across replicas)."""

    w_cost: float
    """The cost weight to route with now."""
    integral: float = 0.0
    """Sum of log spend errors (anti-windup clipped)."""
    rate: float | None = None
    """Smoothed measured spend rate, in the target's unit (None before the first window)."""
    updates: int = 0
    """Controller updates so far."""


_EPS = 1e-6


def _logit(w: float) -> float:
    w = min(max(w, _EPS), 1 - _EPS)
    return math.log(w / (1 - w))


def _sigmoid(u: float) -> float:
    return 1.0 / (1.0 + math.exp(-u)) if u >= 0 else math.exp(u) / (1.0 + math.exp(u))


def window_rate(spend: float, requests: int, seconds: float | None, unit: str) -> float:
    """Spend of one window in the target's unit."""
    if unit == "per_1k_requests":
        return 1000.0 * spend / max(requests, 1)
    if seconds is None or seconds <= 0:
        raise ValueError("a per-hour target needs request timestamps spanning a positive time")
    return spend * 3600.0 / seconds


def pacer_update(state: PacerState, rate: float, config: PacerConfig) -> PacerState:
    """One PI step from a window's measured spend ``rate`` (target's unit) -> new state."""
    smoothed = rate if state.rate is None else config.ema * rate + (1 - config.ema) * state.rate
    error = math.log(max(smoothed, _EPS * config.target) / config.target)
    u0 = _logit(config.w_init)
    lo, hi = _logit(max(config.w_min, _EPS)), _logit(min(config.w_max, 1 - _EPS))
    integral = state.integral + error
    if config.ki > 0:  # anti-windup: the integral alone may not push past the bounds
        integral = min(max(integral, (lo - u0) / config.ki), (hi - u0) / config.ki)
    u = u0 + config.kp * error + config.ki * integral
    w = min(max(_sigmoid(u), config.w_min), config.w_max)
    return PacerState(w_cost=w, integral=integral, rate=smoothed, updates=state.updates + 1)


def cost_weight_adjustment(state: PacerState, config: PacerConfig) -> float:
    """The pacer's demand as a SHIFT of the cost weight in logit units: logit(w_t) - logit(w_init).

    Serving applies it to each request's own preference (:func:`paced_w_cost`), so a request that asks
    for quality keeps more of it than one that asks for thrift, while the shift holds the spend."""
    return _logit(state.w_cost) - _logit(config.w_init)


def paced_w_cost(w_cost: float, adjustment: float) -> float:
    """A request's cost weight under a pacer adjustment: sigmoid(logit(w_cost) + adjustment), in [0, 1]."""
    if adjustment == 0.0:
        return float(w_cost)
    return _sigmoid(_logit(float(w_cost)) + float(adjustment))


def spend_levers(adjustment: float, max_shift: float, greedy_span: float, max_greedy: float) -> tuple[float, float]:
    """A serving budget controller's output (logit units) split into its two levers -> (shift, greedy share).

    First the shift of each request's logit(w_cost), within +-``max_shift``; beyond +``max_shift``,
    the share of explore requests decided greedily instead, growing linearly to ``max_greedy`` over
    ``greedy_span`` more units. Why a second lever: an explore decision keeps EVERY candidate above
    the exploration floor (1 % each by default), so no cost weight takes the spend of explore traffic
    below the floor's own spend on the dear models; on RouterBench's 11 models the identity policy's
    explore traffic costs 0.348 USD per 1k even at w_cost = 1 for every request, while greedy
    decisions at high w_cost pick the cheap models outright. Shift first: below the floor's
    reach it is the cheaper lever in quality."""
    shift = min(max(float(adjustment), -max_shift), max_shift)
    if greedy_span <= 0 or max_greedy <= 0:
        return shift, 0.0
    return shift, min(max((float(adjustment) - max_shift) / greedy_span, 0.0), 1.0) * max_greedy


def combined_greedy_share(shares: Sequence[float]) -> float:
    """Probability that a request governed by several scopes is decided greedily: any scope asking suffices
    (independent draws: 1 - prod(1 - share))."""
    keep = 1.0
    for share in shares:
        keep *= 1.0 - min(max(float(share), 0.0), 1.0)
    return 1.0 - keep


class BudgetPacer:
    """Stateful pacer: feed it each request's cost (and time); read ``w_cost`` before routing."""

    def __init__(self, config: PacerConfig):
        config.validate()
        self.config = config
        self.state = PacerState(w_cost=config.w_init)
        self._spend = 0.0
        self._count = 0
        self._t_start: float | None = None
        self._t_last: float | None = None
        self.history: list[dict[str, float]] = []

    @property
    def w_cost(self) -> float:
        return self.state.w_cost

    def observe(self, cost: float, timestamp: float | None = None) -> None:
        """One routed request's USD cost (and its time, needed for a per-hour target)."""
        if not math.isfinite(cost) or cost < 0:
            raise ValueError(f"pacer: cost must be a finite number >= 0, got {cost}")
        if timestamp is not None:
            if self._t_start is None:
                self._t_start = timestamp
            self._t_last = timestamp
        self._spend += float(cost)
        self._count += 1
        if self._count >= self.config.window:
            self._close_window()

    def observe_many(self, costs: Sequence[float], timestamps: Sequence[float] | None = None) -> None:
        for i, c in enumerate(costs):
            self.observe(float(c), None if timestamps is None else float(timestamps[i]))

    def _close_window(self) -> None:
        seconds = None
        if self._t_start is not None and self._t_last is not None:
            seconds = self._t_last - self._t_start
        rate = window_rate(self._spend, self._count, seconds, self.config.unit)
        self.state = pacer_update(self.state, rate, self.config)
        self.history.append({"rate": rate, "smoothed": self.state.rate or rate, "w_cost": self.state.w_cost})
        self._spend, self._count = 0.0, 0
        self._t_start = self._t_last  # windows are contiguous in time


# --- replay -----------------------------------------------------------------------------------


def _choices(policy, embeddings: np.ndarray, w_cost: float, models: Sequence[str]) -> np.ndarray:
    dec = policy.decide(embeddings, w_cost)
    pool = getattr(dec, "models", None) or policy.models
    col = {m: k for k, m in enumerate(models)}
    return np.array([col[m] for m in pool], dtype=np.int64)[dec.actions]


def replay_with_pacer(
    policy,
    scores: np.ndarray,
    costs: np.ndarray,
    models: Sequence[str],
    embeddings: np.ndarray,
    config: PacerConfig,
    n_requests: int = 20000,
    batch_size: int = 20,
    seed: int = 0,
    requests_per_hour: Sequence[float] = (3600.0,),
) -> dict[str, Any]:
    """Replay a stream of logged prompts (drawn with replacement) through ``policy`` with the pacer.

    Each batch is routed greedily with the pacer's current w_cost; the
    chosen models' LOGGED cost and score are what the stream pays and gets.
    ``requests_per_hour`` gives traffic phases of equal length (Poisson
    arrivals), to test a per-hour target under changing traffic.
    """
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(embeddings), size=n_requests)
    phases = np.array_split(np.arange(n_requests), len(requests_per_hour))
    gaps = np.concatenate([rng.exponential(3600.0 / rate, size=len(p)) for p, rate in zip(phases, requests_per_hour)])
    times = np.cumsum(gaps)
    pacer = BudgetPacer(config)
    spent = np.zeros(n_requests)
    got = np.zeros(n_requests)
    ws = np.zeros(n_requests)
    for start in range(0, n_requests, batch_size):
        b = rows[start : start + batch_size]
        w = pacer.w_cost
        chosen = _choices(policy, embeddings[b], w, models)
        c = costs[b, chosen]
        spent[start : start + len(b)] = c
        got[start : start + len(b)] = np.nan_to_num(scores[b, chosen], nan=0.0)
        ws[start : start + len(b)] = w
        pacer.observe_many(c, times[start : start + len(b)])
    phase_rates = []
    for p in phases:  # second half of each traffic phase: after the pacer re-adapted
        half = p[len(p) // 2 :]
        phase_rates.append(_rate(spent[half], times[half], config.unit) if len(half) > 1 else float("nan"))
    return summarise_replay(
        spent, got, ws, times, config, requests_per_hour=list(requests_per_hour), phase_rates_second_half=phase_rates, history=pacer.history
    )


def _rate(spent: np.ndarray, times: np.ndarray, unit: str) -> float:
    if unit == "per_1k_requests":
        return 1000.0 * float(spent.mean())
    span = float(times[-1] - times[0]) if len(times) > 1 else 0.0
    return float(spent.sum()) * 3600.0 / span if span > 0 else float("nan")


def summarise_replay(
    spent: np.ndarray, got: np.ndarray, ws: np.ndarray, times: np.ndarray, config: PacerConfig, **extra: Any
) -> dict[str, Any]:
    """Tracking metrics: cumulative spend vs target, error of 1k-request blocks after warm-up."""
    n = len(spent)
    warm = n // 5
    block = 1000
    blocks = []
    for s in range(warm, n - block + 1, block):
        blocks.append(_rate(spent[s : s + block], times[s : s + block], config.unit))
    blocks_arr = np.array(blocks, dtype=np.float64)
    overall = _rate(spent, times, config.unit)
    after = _rate(spent[warm:], times[warm:], config.unit)
    return {
        "target": config.target,
        "unit": config.unit,
        "requests": n,
        "achieved_rate": overall,
        "achieved_rate_after_warmup": after,
        "relative_error": overall / config.target - 1.0,
        "relative_error_after_warmup": after / config.target - 1.0,
        "block_mape_after_warmup": float(np.mean(np.abs(blocks_arr / config.target - 1.0))) if len(blocks_arr) else float("nan"),
        "mean_score": float(got.mean()),
        "mean_score_after_warmup": float(got[warm:].mean()),
        "mean_w_cost_after_warmup": float(ws[warm:].mean()),
        "config": asdict(config),
        **extra,
    }


def static_w_for_spend(
    policy, scores, costs, models, embeddings, target_per_request: float, iters: int = 14
) -> tuple[float, float, float]:
    """In hindsight: the fixed w_cost whose mean cost per prompt (over ``embeddings``) meets the
    target, by bisection -> (w, mean cost per request, mean score). Quality benchmark for the pacer."""
    lo, hi = 0.0, 1.0
    rows = np.arange(len(embeddings))

    def at(w: float) -> tuple[float, float]:
        chosen = _choices(policy, embeddings, w, models)
        return float(costs[rows, chosen].mean()), float(np.nan_to_num(scores[rows, chosen], nan=0.0).mean())

    for _ in range(iters):
        mid = (lo + hi) / 2
        cost, _ = at(mid)
        if cost > target_per_request:
            lo = mid
        else:
            hi = mid
    cost, score = at(hi)
    return hi, cost, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m banditroute.policy.pacer",
        description="Replay logged prompts through a trained policy with the budget pacer; print tracking metrics as JSON.",
    )
    parser.add_argument("--policy", required=True, help="policy checkpoint (BaRP or identity)")
    parser.add_argument("--data", required=True, help="routing data (RouterBench layout)")
    parser.add_argument("--split", choices=("all", "test"), default="test", help="replay every prompt or the held-out 20%% (seeded prompt split)")
    parser.add_argument("--targets", default="1.0", help="comma-separated spend targets (USD per unit)")
    parser.add_argument("--unit", choices=UNITS, default="per_1k_requests")
    parser.add_argument("--requests", type=int, default=20000, help="requests in the replayed stream")
    parser.add_argument("--requests-per-hour", default="3600", help="traffic phases, comma-separated (per-hour targets)")
    parser.add_argument("--window", type=int, default=PacerConfig.window)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="~/.cache/banditroute/embeddings")
    parser.add_argument("--out", help="write the results JSON here too")
    args = parser.parse_args(argv)

    from banditroute.core.data import load_routing_data, split_by_prompt
    from banditroute.policy.checkpoint import load_policy
    from banditroute.policy.encoders import embed_prompts

    policy = load_policy(args.policy)
    data = load_routing_data(args.data)
    if args.split == "test":
        _, data = split_by_prompt(data, 0.2, args.seed)
    missing = [m for m in policy.models if m not in data.models]
    if missing:
        raise SystemExit(f"the data lacks the policy's model(s) {missing}")
    emb, enc_id = embed_prompts(data.prompts, replace(policy.meta.encoder, device="cpu"), None if args.cache_dir == "none" else args.cache_dir)
    rates = [float(r) for r in args.requests_per_hour.split(",")]
    results = []
    for target in [float(t) for t in args.targets.split(",")]:
        cfg = PacerConfig(target=target, unit=args.unit, window=args.window)
        res = replay_with_pacer(policy, data.scores, data.costs, data.models, emb, cfg, args.requests, seed=args.seed, requests_per_hour=rates)
        res.pop("history", None)
        if args.unit == "per_1k_requests":
            w, c, s = static_w_for_spend(policy, data.scores, data.costs, data.models, emb, target / 1000.0)
            res["static_w_in_hindsight"] = {"w_cost": w, "rate": 1000 * c, "mean_score": s}
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}, default=float), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
