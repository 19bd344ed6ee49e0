"""RouterCore: batched prompt encoding + policy decisions, without Ray.

The Serve ``Router`` deployment wraps one RouterCore per replica; the raw
benchmark drives it directly. Per batch it does exactly:

1. ONE tokenizer call (host; pinned memory when the encoder is on CUDA) on
   texts clipped to what the encoder's token window can see (``tokenize``),
   or none when the rows came tokenized (``RouteRequest.tokens``: an ingress
   ran the same tokenizer, serve/tokens.py; the rows are only padded here),
2. ONE encoder forward (fp16 on GPU) that leaves the embeddings on the device,
3. ONE host->device copy of the per-row inputs (w_cost, explore flag, candidate mask),
4. ONE policy forward, then ``policy.decide.decide``: explore rows are
   sampled within the exploration bounds and greedy rows argmaxed (the same
   rule the offline trainers and the RLModule use),
5. ONE device->host copy of (action, propensity, probabilities, embedding).

Each decided row is a ``records.DecisionRecord`` inside its RouteResult; the
batch goes to the decision sink as the Arrow table of
``records.decisions_to_table`` (:func:`decision_batch`), the one encoding of
decisions from the router to the log.

No per-request ``.cpu()``/``.item()``: a GPU replica is never launch- or
sync-bound by the number of requests in the batch.

Weights are swapped by replacing the policy REFERENCE under a lock; a batch
reads the reference once, so every row of a batch is decided by one version
and a swap lands between batches. The version served is the policy's, which
is the version of the snapshot or checkpoint it was loaded from.

This module must not import Ray (the raw benchmark runs where Ray is absent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import torch

from banditroute.core.records import DecisionRecord, WeightsSnapshot, decisions_to_table, new_decision_id
from banditroute.policy.base import RoutingPolicy
from banditroute.policy.checkpoint import load_policy, policy_from_snapshot, policy_from_state
from banditroute.policy.decide import decide
from banditroute.policy.encoders import EncoderConfig, make_encoder, resolve_device
from banditroute.policy.exploration import DEFAULT_EXPLORATION_CEILING, DEFAULT_EXPLORATION_FLOOR, ExplorationBounds
from banditroute.policy.experiments import ExperimentConfig
from banditroute.serve.experiments import apply_overrides
from banditroute.serve.pinned_arms import PinnedArms
from banditroute.serve.protocol import RequestError, RouteRequest, parse_candidates, parse_mode
from banditroute.serve.stages import NO_STAGES, StageClock
from banditroute.serve.tokens import PromptTokenizer, TokenRow, has_tokenizer

@dataclass
class RouteResult:
    """The outcome of one RouteRequest: its decision, or an error naming the field."""

    decision: DecisionRecord | None = None
    """The decision (embedding as a float32 array); None when the request could not be routed."""
    error: dict[str, Any] | None = None
    """{'status': 4xx/5xx, 'field': str, 'message': str} when the request could not be routed (or logged)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def _decided(self) -> DecisionRecord:
        if self.decision is None:
            raise AttributeError(f"an unrouted request has no decision: {self.error}")
        return self.decision

    @property
    def decision_id(self) -> str:
        return self._decided().decision_id

    @property
    def model(self) -> str:
        """Chosen model."""
        return self._decided().chosen_model

    @property
    def probability(self) -> float:
        """Probability with which ``model`` was picked in this mode (1.0 when greedy)."""
        return self._decided().probability

    @property
    def probabilities(self) -> dict[str, float]:
        """The distribution the decision was drawn from, over the candidates (sums to 1)."""
        d = self._decided()
        return dict(zip(d.candidates, d.candidate_probabilities))

    @property
    def policy_version(self) -> int:
        return self._decided().policy_version

    @property
    def mode(self) -> str:
        return self._decided().mode

    @property
    def embedding(self) -> np.ndarray:
        """(d,) float32 prompt embedding."""
        return self._decided().embedding

    def response(self) -> dict[str, Any]:
        """The /v1/route answer (the contract's keys, plus mode and w_cost; experiment/arm and the
        policy's own choice when an experiment or shadow mode set the model)."""
        d = self._decided()
        out = {
            "decision_id": d.decision_id,
            "model": d.chosen_model,
            "probability": d.probability,
            "probabilities": self.probabilities,
            "policy_version": d.policy_version,
            "mode": d.mode,
            "w_cost": d.w_cost,
        }
        if d.experiment:
            out.update(experiment=d.experiment, arm=d.arm)
        if d.override:
            out.update(override=d.override, router_model=d.router_model, router_probability=d.router_probability)
        return out

    def record(self, upstream_cost: float | None = None, served_model: str | None = None) -> DecisionRecord:
        """The decision with what the upstream call added (its cost, the model that really answered)."""
        return dataclasses.replace(self._decided(), upstream_cost=upstream_cost, served_model=served_model)


def prompt_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def as_route_request(item: Any) -> RouteRequest:
    """Accept RouteRequest or a (text, w_cost, candidates, mode) tuple."""
    if isinstance(item, RouteRequest):
        return item
    if isinstance(item, dict):
        return RouteRequest(**item)
    text, w_cost, *rest = item
    candidates = rest[0] if len(rest) > 0 else None
    mode = rest[1] if len(rest) > 1 else "explore"
    return RouteRequest(text=text, w_cost=float(w_cost), candidates=None if candidates is None else list(candidates), mode=mode)


def decision_batch(
    results: Sequence[RouteResult],
    upstream_costs: Sequence[float | None] | None = None,
    served_models: Sequence[str | None] | None = None,
) -> pa.Table:
    """The Arrow batch (records.DECISION_SCHEMA) a sink stores for the routed ``results`` (errors skipped),
    with each upstream call's cost and answering model when the caller has them."""
    n = len(results)
    costs = list(upstream_costs) if upstream_costs is not None else [None] * n
    served = list(served_models) if served_models is not None else [None] * n
    return decisions_to_table([r.record(c, m) for r, c, m in zip(results, costs, served) if r.ok])


class RouterCore:
    """An encoder + a routing policy on one device, deciding batches of requests.

    The policy is any ``policy.base.RoutingPolicy`` ('barp', 'identity': the
    registry ``policy.checkpoint.POLICY_KINDS`` builds it from a checkpoint or
    a weights snapshot). The pool (``models``) is read once per batch, since an
    identity policy's is live.
    """

    def __init__(
        self,
        policy: RoutingPolicy,
        encoder: Any | None = None,
        *,
        seed: int | None = None,
        torch_threads: int = 0,
        exploration_floor: float = DEFAULT_EXPLORATION_FLOOR,
        exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING,
    ):
        self.bounds = ExplorationBounds(float(exploration_floor), float(exploration_ceiling))
        """What explore rows are sampled within (serving config exploration_floor / exploration_ceiling)."""
        if torch_threads > 0:
            torch.set_num_threads(int(torch_threads))
        self.device = policy.device
        if encoder is None:
            encoder = make_encoder(dataclasses.replace(policy.encoder, device=str(self.device)))
        self.encoder = encoder
        self.encoder_id = str(encoder.encoder_id)
        self._check_compatible(policy.encoder_id, policy.embed_dim, "the checkpoint")
        policy.network.eval()
        self._lock = threading.Lock()
        self._policy = policy
        self._generator: torch.Generator | None = None
        if seed is not None:
            self._generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._pin = self.device.type == "cuda"
        self.tokenizer = PromptTokenizer(encoder) if has_tokenizer(encoder) else None
        """The encoder's tokenizer (serve/tokens.py); None for encoders that take text (hashing, static)."""
        self.experiments: list[ExperimentConfig] = []
        """Experiments whose arms are applied to every decided batch (serve/experiments.py); set by the service."""
        self.pinned = PinnedArms()
        """Policies of the experiments' pinned arms (serve/pinned_arms.py); set by the service."""
        self.stages: StageClock = NO_STAGES
        """Times tokenize / encode / decide per batch (serve/stages.py); the service gives it its histogram."""

    # --- construction ------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, path: str, *, device: str = "auto", **options: Any) -> "RouterCore":
        """Load a policy checkpoint and build the encoder it was trained with, on ``device``."""
        dev = resolve_device(device)
        return cls.with_encoder(load_policy(path, device=dev), dev, **options)

    @classmethod
    def from_state(cls, state: dict[str, Any], *, device: str = "auto", **options: Any) -> "RouterCore":
        """From ``policy.state()`` of any kind (its version: the one the state's meta records)."""
        dev = resolve_device(device)
        return cls.with_encoder(policy_from_state(state, device=dev), dev, **options)

    @classmethod
    def from_snapshot(cls, snapshot: WeightsSnapshot, *, device: str = "auto", **options: Any) -> "RouterCore":
        """From a parameter server's WeightsSnapshot, serving the snapshot's version."""
        dev = resolve_device(device)
        return cls.with_encoder(policy_from_snapshot(snapshot, device=dev), dev, **options)

    @classmethod
    def with_encoder(
        cls,
        policy: RoutingPolicy,
        device: str,
        *,
        seed: int | None = None,
        torch_threads: int = 0,
        encoder_overrides: dict[str, Any] | None = None,
        exploration_floor: float = DEFAULT_EXPLORATION_FLOOR,
        exploration_ceiling: float = DEFAULT_EXPLORATION_CEILING,
    ) -> "RouterCore":
        """A core for ``policy`` (on ``device``) with the encoder it was trained with."""
        return cls(policy, cls._make_encoder(policy, device, encoder_overrides), seed=seed, torch_threads=torch_threads,
                   exploration_floor=exploration_floor, exploration_ceiling=exploration_ceiling)

    @staticmethod
    def _make_encoder(policy: RoutingPolicy, device: str, overrides: dict[str, Any] | None):
        cfg: EncoderConfig = dataclasses.replace(policy.encoder, device=device, **(overrides or {}))
        return make_encoder(cfg)

    def _check_compatible(self, encoder_id: str, embed_dim: int, what: str) -> None:
        if encoder_id and encoder_id != self.encoder_id:
            raise ValueError(
                f"encoder mismatch: {what} was trained on encoder_id {encoder_id!r} but the serving encoder "
                f"is {self.encoder_id!r}; serve it with the same encoder settings (name, max_tokens, model_path)"
            )
        if int(embed_dim) != int(self.encoder.dim):
            raise ValueError(f"embedding size mismatch: {what} expects {embed_dim}, the encoder gives {self.encoder.dim}")

    # --- state ---------------------------------------------------------------

    @property
    def exploration_floor(self) -> float:
        return self.bounds.floor

    @property
    def exploration_ceiling(self) -> float:
        return self.bounds.ceiling

    @property
    def policy(self) -> RoutingPolicy:
        with self._lock:
            return self._policy

    @property
    def policy_version(self) -> int:
        return self.policy.policy_version

    @property
    def models(self) -> list[str]:
        return list(self.policy.models)

    def swap_weights(self, snapshot: WeightsSnapshot) -> int:
        """Install a newer snapshot atomically (between batches); returns the version now served.

        Older or equal versions are ignored. A snapshot for another encoder or
        embedding size raises ValueError and changes nothing.
        """
        current = self.policy
        if snapshot.policy_version <= current.policy_version:
            return current.policy_version
        meta = snapshot.state["meta"]
        self._check_compatible(meta.get("encoder_id", ""), meta["embed_dim"], f"snapshot v{snapshot.policy_version}")
        fresh = policy_from_snapshot(snapshot, device=self.device)
        fresh.network.eval()
        with self._lock:
            self._policy = fresh
        return fresh.policy_version

    # --- inference -------------------------------------------------------------

    @property
    def clip_fallbacks(self) -> int:
        """Batches re-tokenized unclipped (``PromptTokenizer.tokenize``)."""
        return self.tokenizer.clip_fallbacks if self.tokenizer is not None else 0

    def tokenize(self, texts: Sequence[str]):
        """One tokenizer call on ``texts`` (long texts clipped first, same ids: ``PromptTokenizer.tokenize``)."""
        if self.tokenizer is None:
            raise TypeError(f"encoder {self.encoder_id!r} takes text, not tokens")
        return self.tokenizer.tokenize(texts)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, d) float32 embeddings on the device: one tokenizer call, one forward."""
        if self.tokenizer is not None:
            with self.stages.stage("tokenize"):
                tokens = self.tokenize(texts)
            with self.stages.stage("encode"):
                return self.encoder.embed_tokens(tokens)
        with self.stages.stage("encode"):  # text encoders (hashing, static) tokenize inside
            vecs = torch.from_numpy(np.ascontiguousarray(self.encoder.encode(list(texts)), dtype=np.float32))
            return vecs.to(self.device)

    def embed_rows(self, rows: Sequence[TokenRow | None], texts: Sequence[str | None]) -> torch.Tensor:
        """(B, d) embeddings of rows already tokenized (an ingress did it), the others tokenized here in one
        call (``texts[i]`` where ``rows[i]`` is None); one forward for all."""
        if self.tokenizer is None:
            raise ValueError(f"encoder {self.encoder_id!r} takes text, not tokens")
        rows = list(rows)
        missing = [i for i, row in enumerate(rows) if row is None]
        with self.stages.stage("tokenize"):  # the rows' padding (and the missing rows' tokenizer call)
            if missing:
                for i, row in zip(missing, self.tokenizer.rows([texts[i] for i in missing])):
                    rows[i] = row
            batch = self.tokenizer.collate(rows, pin=self._pin)
        with self.stages.stage("encode"):
            return self.encoder.embed_tokens(batch)

    def route_batch(self, items: Sequence[Any]) -> list[RouteResult]:
        """Decide a batch: items are RouteRequest or (text, w_cost, candidates|None, mode) tuples.

        Rows that cannot be routed (unknown candidate, bad mode) get a result
        with ``error`` set; the others are decided in one forward.
        """
        reqs = [as_route_request(x) for x in items]
        now = time.time()
        with self._lock:
            policy = self._policy
        models = list(policy.models)  # read once: the batch's pool
        index = {m: k for k, m in enumerate(models)}
        n_models = len(models)
        results: list[RouteResult | None] = [None] * len(reqs)
        host = np.zeros((len(reqs), 2 + n_models), dtype=np.float32)  # [w_cost, explore, mask...]
        valid: list[int] = []
        cand_lists: list[list[str]] = []
        modes: list[str] = []
        for i, req in enumerate(reqs):
            try:  # the same checks as the HTTP parser: the pool may have changed since the request was parsed
                mode = parse_mode(req.mode, "explore")
                cands = parse_candidates(req.candidates, models)
                if req.tokens is None and (not isinstance(req.text, str) or not req.text):
                    raise RequestError(422, "prompt", "prompt must be a non-empty string")
                if req.tokens is not None and self.tokenizer is None:
                    raise RequestError(422, "prompt", f"encoder {self.encoder_id!r} takes text, not token ids")
                if req.shadow_model is not None and req.shadow_model not in (cands if cands is not None else models):
                    raise RequestError(422, "model", f"shadow model {req.shadow_model!r} is not among the candidates "
                                                     f"{cands if cands is not None else models}")
            except RequestError as exc:
                results[i] = RouteResult(error=exc.to_router())
                continue
            host[i, 0] = req.w_cost
            host[i, 1] = 1.0 if mode == "explore" else 0.0
            if cands is None:
                host[i, 2:] = 1.0
                cand_lists.append(list(models))
            else:
                host[i, [2 + index[c] for c in cands]] = 1.0
                cand_lists.append(cands)
            modes.append(mode)
            valid.append(i)
        if not valid:
            return results  # type: ignore[return-value]

        ids = [new_decision_id() for _ in valid]  # before the forward: a pinned arm's key may be the decision id
        host = host[valid] if len(valid) != len(reqs) else host
        out = self._forward(policy, [reqs[i] for i in valid], host)
        deciders = self.pinned.decide(self, self.experiments, [reqs[i] for i in valid], ids, cand_lists, models, host, out)
        dim = out.shape[1] - 2 - n_models
        for row, i in enumerate(valid):
            req = reqs[i]
            decider = deciders[row] or policy
            cands = cand_lists[row]
            probs = out[row, 2 : 2 + n_models]
            results[i] = RouteResult(
                DecisionRecord(
                    decision_id=ids[row],
                    time=now,
                    embedding=out[row, 2 + n_models : 2 + n_models + dim].copy(),
                    w_cost=float(req.w_cost),
                    candidates=cands,
                    chosen_model=models[int(out[row, 0])],
                    probability=float(out[row, 1]),
                    policy_version=decider.policy_version,
                    mode=modes[row],
                    candidate_probabilities=[float(probs[index[m]]) for m in cands],
                    encoder_id=self.encoder_id,
                    prompt_sha256=req.prompt_sha256 or prompt_sha256(req.text),
                    registry_version=getattr(decider, "registry_version_used", None),  # identity policies: pool/prices version
                )
            )
        if self.experiments or any(q.shadow_model or q.tenant for q in reqs):
            decided = apply_overrides([r.decision for r in results], reqs, self.experiments,  # type: ignore[union-attr]
                                      self.pinned.pinnable(models))
            for r, d in zip(results, decided):
                if r is not None and d is not None:
                    r.decision = d
        return results  # type: ignore[return-value]

    def _forward(self, policy: RoutingPolicy, reqs: list[RouteRequest], host: np.ndarray) -> np.ndarray:
        """One encoder forward + one policy forward; returns (B, 2 + K + d) on the host."""
        with torch.inference_mode():
            if any(req.tokens is not None for req in reqs):
                emb = self.embed_rows([req.tokens for req in reqs], [req.text for req in reqs])
            else:
                emb = self.embed([req.text for req in reqs])
            return self.decide_embedded(policy, emb, host)

    def decide_embedded(self, policy: RoutingPolicy, emb: torch.Tensor, host: np.ndarray) -> np.ndarray:
        """Policy forward on device embeddings ``emb`` (B, d) with per-row inputs ``host``
        (B, 2 + K: w_cost, explore flag, candidate mask); returns the packed (B, 2 + K + d)
        host array [action, propensity, probabilities..., embedding...] after ONE copy."""
        with torch.inference_mode(), self.stages.stage("decide"):
            inputs = torch.from_numpy(host)
            if self._pin:
                inputs = inputs.pin_memory()
            inputs = inputs.to(self.device, non_blocking=True)
            w_cost, explore, mask = inputs[:, 0], inputs[:, 1] > 0.5, inputs[:, 2:] > 0.5
            decided = decide(policy.logits(emb, w_cost, mask), explore, self.bounds, self._generator, mask)
            packed = torch.cat(
                [decided.actions.unsqueeze(1).float(), decided.propensities.unsqueeze(1), decided.probabilities, emb.float()],
                dim=1,
            )
            return packed.cpu().numpy()  # the batch's single device->host copy
