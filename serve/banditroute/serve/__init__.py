"""Serving: Ray Serve router replicas with batched inference, the HTTP API and the replay upstream.

Modules (only ``app`` and ``client`` import Ray; the rest are importable
without it, so the raw benchmark runs on a machine with only torch and
transformers):

- ``config``: ``RouterConfig`` (+ ``UpstreamConfig``, ``ReplayConfig``).
- ``core``: ``RouterCore``, the batched encoder + policy inference, no Ray.
- ``protocol``: request parsing/validation shared by HTTP and the Python API.
- ``decision_sinks``: ``DECISION_SINKS`` registry and the durable local log.
- ``replay``: an OpenAI-compatible server answering with logged responses.
- ``app``: the Serve deployments ``RouterIngress`` and ``Router``, ``build_app``.
- ``client``: ``RouterClient`` for in-cluster callers (DeploymentHandle).
"""
