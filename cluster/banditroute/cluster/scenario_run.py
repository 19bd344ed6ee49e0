"""Run a scenario (cluster/scenario.py): the identity policy served AND learning online, events applied through the admin API.

What runs: `banditroute up`'s online loop over a COPY of the identity
checkpoint (``<up.out>/policy``: the scenario's registry changes never touch
the source). The copy's ``meta.registry_uri`` names its registry document
(absolute path), the ONE live registry: the pool admin API (admin key made
for this run) writes price changes and onboarded models there, the identity
learner (learner/identity_learner.py) writes refined identities there, and
the replicas re-read it while routing; their network weights come from the
parameter server as the learner trains them from the posted feedback.
What changes routing: models withheld at the start, onboarded from a quiz
answered with the data's outcomes, price changes that the driver also
charges from then on, the learner's weights and identities, and (with
``budget_usd_per_1k``) the budget pacer of the ingress (serve/budget.py).

``summary.json`` holds the usual traffic figures plus ``events`` (each
event's model, its traffic share and the mean reward over the ``window``
decisions before and after), ``spend_usd_per_1k`` {whole, last_half}, the
learner's progress and the final registry (``registry_final``).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from banditroute.cluster.config import AppConfig
from banditroute.cluster.scenario import ScenarioConfig, event_effect, load_scenario, most_used, spend_per_1k
from banditroute.cluster.traffic import TrafficState, drive_traffic
from banditroute.core.config import ConfigError

ADMIN_KEY_ENV = "BANDITROUTE_SCENARIO_ADMIN_KEY"
"""Environment variable holding this run's admin key (made fresh per run; replicas inherit it)."""
QUIZ_POOL_ROWS = 500
"""Onboarding: the model's first this-many scored prompts of the data are the pool the adaptive quiz picks from."""
SETTLE_AFTER_EVENT_S = 1.0
"""Pause after an event so every replica serves the new registry version (they re-read it every 0.5 s)."""


def prepare_policy(source: str, out: Path, withhold: list[str]) -> Any:
    """Copy the identity checkpoint ``source`` to ``out`` (own live registry beside it, named by absolute path in
    ``meta.registry_uri``), withheld models retired."""
    from banditroute.policy.checkpoint import checkpoint_kind
    from banditroute.policy.identity_policy import IdentityPolicy

    if checkpoint_kind(source) != "identity":
        raise ConfigError(f"up.scenario: the served policy must be an identity policy (--policy CKPT from "
                          f"`banditroute train --kind identity`); {source} is {checkpoint_kind(source)!r}")
    policy = IdentityPolicy.load(source, registry_refresh_s=None)
    registry = policy.registry.copy()
    if out.exists():
        shutil.rmtree(out)
    policy.registry, policy.meta.registry_uri = registry, str((out / "registry.json").resolve())
    policy.save(out)  # registry.json beside the weights; the registry persists there from now on
    for name in withhold:
        registry.retire(name)
    return policy


def run_scenario(app: AppConfig) -> dict[str, Any]:
    """`banditroute up --scenario FILE`: serve the identity policy, drive traffic, apply the events, write summary.json."""
    import logging

    from banditroute.cluster.runner import running_application
    from banditroute.core.data import load_routing_data, resolve_data_path

    logging.getLogger("httpx").setLevel(logging.WARNING)
    up = app.up
    scenario = load_scenario(up.scenario)
    source = app.online.initial_policy or app.router.policy
    if source is None:
        raise ConfigError("up.scenario: give the identity policy to serve with --policy CKPT")
    out = Path(up.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data = load_routing_data(resolve_data_path(up.data))
    policy = prepare_policy(source, out / "policy", scenario.withhold)
    scenario.check_models(list(data.models), policy.registry.all_models)

    os.environ[ADMIN_KEY_ENV] = admin_key = secrets.token_hex(16)
    run_app = copy.deepcopy(app)
    run_app.online.enabled = True  # the identity learner trains the served policy (cluster/online.py wires it)
    run_app.online.initial_policy = run_app.router.policy = str(out / "policy")
    run_app.router.security.admin_api_keys_env = ADMIN_KEY_ENV
    configure_budget(run_app, scenario)
    if hasattr(run_app.router.security, "admin_max_body_bytes"):  # an onboarding quiz carries its answers
        run_app.router.security.admin_max_body_bytes = max(run_app.router.security.admin_max_body_bytes, 4 * 1024 * 1024)
    print(f"banditroute up --scenario {up.scenario}: identity policy {source} (copy in {out / 'policy'}), pool "
          f"{policy.registry.models}, withheld {scenario.withhold}; {len(scenario.events)} events", flush=True)
    with running_application(run_app, None, up.ready_timeout_s, final_checkpoint=False,
                             include_dashboard=False, log_to_driver=False) as running:
        state = TrafficState(list(data.models), min(up.curve_window, max(1, up.max_decisions or up.curve_window)))
        events: list[dict[str, Any]] = []
        started = time.monotonic()
        asyncio.run(_drive(running.base_url, data, policy.tau, list(running.health["models"]), state, up, scenario,
                           admin_key, events))
        drive_s = time.monotonic() - started
        learner = settle_learner(running, up.settle_timeout_s)
        learner["served_kind"] = running.health.get("policy_kind")
        pacer = budget_view(run_app) if run_app.router.budget.enabled else None
    summary = scenario_summary(state, scenario, events, policy.tau, drive_s, source)
    summary["learner"] = learner
    summary["registry_final"] = registry_figures(out / "policy" / "registry.json")
    if scenario.budget_usd_per_1k is not None:
        summary["budget"] = budget_comparison(source, data, state, scenario.budget_usd_per_1k)
        summary["budget"]["pacer_final"] = pacer
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for e in summary["events"]:
        print(f"event at {e['at']}: {e['kind']} {e['model']}: share {e['share_before']} -> {e['share_after']}, "
              f"reward {e['reward_before']} -> {e['reward_after']}", flush=True)
    print(f"spend USD/1k requests: {summary['spend_usd_per_1k']}; budget {scenario.budget_usd_per_1k}", flush=True)
    print(out / "summary.json", flush=True)
    return summary


async def _drive(base_url: str, data, tau: float, pool: list[str], state: TrafficState, up, scenario: ScenarioConfig,
                 admin_key: str, events: list[dict[str, Any]]) -> None:
    pending = list(scenario.events)
    factors: dict[str, float] = {}
    lock = asyncio.Lock()
    headers = {"x-api-key": admin_key}

    async def before_request(client) -> None:
        if not pending or state.claimed < pending[0].at:
            return
        async with lock:
            while pending and state.claimed >= pending[0].at:
                while state.decisions < state.claimed:  # the requests in flight finish first: `at` is exact
                    await asyncio.sleep(0.01)
                event = pending.pop(0)
                events.append(await _apply(client, event, data, state, scenario.window, factors, headers))
                await asyncio.sleep(SETTLE_AFTER_EVENT_S)

    await drive_traffic(base_url, data, tau, pool, state, up.max_decisions, up.concurrency, up.seed,
                        up.max_error_fraction, asyncio.Event(), post_feedback=True, price_factors=factors,
                        before_request=before_request)


async def _apply(client, event, data, state: TrafficState, window: int, factors: dict[str, float],
                 headers: dict[str, str]) -> dict[str, Any]:
    at = state.decisions
    if event.onboard is not None:
        from banditroute.policy.onboard import quiz_results_from_data

        quiz = quiz_results_from_data(data, event.onboard)
        model = event.onboard
        price = float(np.nanmean(data.costs[:, data.model_index(model)]))
        body = {"name": model, "price": price, "replace": True, "quiz_size": event.quiz,
                "quiz": [{"prompt": p, "score": float(s)} for p, s in zip(quiz.prompts[:QUIZ_POOL_ROWS], quiz.scores[:QUIZ_POOL_ROWS])]}
        resp = await client.post("/v1/admin/models", json=body, headers=headers, timeout=600.0)
    else:
        chosen = [state.models[k] for k in state.chosen]
        model = most_used(chosen, at, window) if event.price == "top" else event.price
        listed = (await client.get("/v1/admin/models", headers=headers)).json()
        current = next(m["price"] for m in listed["models"] if m["name"] == model)
        price = current * event.factor if event.factor is not None else float(event.usd)
        resp = await client.patch(f"/v1/admin/models/{model}", json={"price": price}, headers=headers)
        if resp.status_code == 200:  # the driver charges the new price too: the logged cost scaled alike
            factors[model] = factors.get(model, 1.0) * (price / current if current > 0 else 1.0)
    if resp.status_code not in (200, 201):
        raise RuntimeError(f"scenario event at {event.at} ({event.kind} {model}) refused: HTTP {resp.status_code} {resp.text[:300]}")
    answer = resp.json()
    print(f"event at decision {at}: {event.kind} {model} (price {price:.6g} USD/call, registry v{answer['registry_version']})",
          flush=True)
    return {"at": at, "kind": event.kind, "model": model, "price": price, "registry_version": answer["registry_version"]}


def configure_budget(app: AppConfig, scenario: ScenarioConfig) -> None:
    """The scenario's ``budget_usd_per_1k`` becomes the router's global spend target (serve/budget.py paces it)."""
    if scenario.budget_usd_per_1k is not None:
        app.router.budget.target_usd_per_1k = float(scenario.budget_usd_per_1k)


def budget_comparison(source: str, data, state: TrafficState, target_usd_per_1k: float) -> dict[str, Any]:
    """The run's second half next to the best STATIC cost weight in hindsight on the same prompts: the w whose
    greedy routing by the starting policy (``source``, its full pool) spends the target (bisection,
    ``policy.pacer.static_w_for_spend``); mean score (quality at that spend) and spend of each."""
    from banditroute.policy.encoders import make_encoder
    from banditroute.policy.identity_policy import IdentityPolicy
    from banditroute.policy.pacer import static_w_for_spend

    half = len(state.rows) // 2
    rows = np.asarray(state.rows[half:], dtype=np.int64)
    chosen = np.asarray(state.chosen[half:], dtype=np.int64)
    policy = IdentityPolicy.load(source, registry_refresh_s=None)
    emb = np.asarray(make_encoder(policy.encoder).encode([data.prompts[r] for r in rows]), dtype=np.float32)
    scores, costs = data.scores_filled[rows], data.costs[rows]
    w, cost, score = static_w_for_spend(policy, scores, costs, list(data.models), emb, target_usd_per_1k / 1000.0)
    return {"target_usd_per_1k": target_usd_per_1k,
            "run_last_half": {"spend_usd_per_1k": float(np.mean(state.costs[half:]) * 1000.0),
                              "mean_score": float(scores[np.arange(len(rows)), chosen].mean()),
                              "mean_reward": float(np.mean(state.rewards[half:]))},
            "static_in_hindsight": {"w_cost": w, "spend_usd_per_1k": cost * 1000.0, "mean_score": score}}


def budget_view(app: AppConfig) -> dict[str, Any] | None:
    """The budget actor's last view (per scope: shift, greedy share, at_limit, spend rate); None when unreachable."""
    import ray

    from banditroute.serve.budget import actor_name

    try:
        actor = ray.get_actor(actor_name(app.router.app_name), namespace=app.router.parameter_server_namespace)
        return ray.get(actor.view.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - a figure of the summary, not worth failing the run for
        return None


def settle_learner(running, timeout_s: float) -> dict[str, Any]:
    """Drain the feedback into the learner and take its final checkpoint; what it trained."""
    import ray

    loop = running.loop
    ray.get(loop.feedback.flush.remote(timeout_s))
    status = ray.get(loop.learner.status.remote())
    checkpoint = ray.get(loop.learner.shutdown.remote())
    keys = ("learner_kind", "start_version", "policy_version", "serving_version", "candidate_version", "updates",
            "events_trained", "skipped")
    return dict({k: status.get(k) for k in keys}, checkpoint=checkpoint)


def registry_figures(path: Path) -> dict[str, Any]:
    """The live registry at the end of the run: its version and each model's price and n_observations."""
    doc = json.loads(Path(path).read_text())
    return {"version": doc.get("version"),
            "models": {m["name"]: {"price": m["price"], "n_observations": m["n_observations"], "active": m["active"],
                                   "source": m["source"]} for m in doc.get("models", [])}}


def scenario_summary(state: TrafficState, scenario: ScenarioConfig, events: list[dict[str, Any]], tau: float,
                     drive_s: float, source: str) -> dict[str, Any]:
    """summary.json of a scenario run (pure over what the driver recorded)."""
    chosen = [state.models[k] for k in state.chosen]
    effects = [dict(e, **event_effect(e["at"], e["model"], chosen, state.rewards, scenario.window)) for e in events]
    spend = spend_per_1k(state.costs)
    budget = scenario.budget_usd_per_1k
    return {
        "decisions": state.decisions,
        "policy": source,
        "policy_kind": "identity",
        "withheld": scenario.withhold,
        "events": effects,
        "spend_usd_per_1k": spend,
        "budget_usd_per_1k": budget,
        "budget_error_last_half": (spend["last_half"] / budget - 1.0) if budget and spend["last_half"] is not None else None,
        "mean_reward": float(np.mean(state.rewards)) if state.rewards else None,
        "reward_curve": state.reward_curve,
        "traffic_share_final": state.share(state.window),
        "decisions_per_s": state.decisions / drive_s if drive_s > 0 else None,
        "route_errors": state.route_errors,
        "last_error": state.last_error,
        "tau": tau,
    }
