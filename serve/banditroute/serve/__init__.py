"""Serving: Ray Serve router replicas with batched inference, the HTTP API and the replay upstream.

The application (built by ``banditroute.cluster.app:build_app``) is
``RouterIngress`` (HTTP), deciding either itself (``placement: inline``, one
hop per route: cheap encoders) or through a ``Router`` deployment
(``placement: replica``: heavy encoders on GPUs), plus ``ReplayUpstream``
when replay is enabled; those deployment names are a contract (k8s
manifests, serveConfigV2).

Modules that import Ray:

- ``service``: ``RouterService``, what a deciding replica runs around its RouterCore
  (``@serve.batch``, decisions logged before answering, weights long-polled from the
  parameter server, metrics, info), hosted by either placement.
- ``router``: the ``Router`` deployment (a RouterService per replica).
- ``decider``: the ``Decider`` interface of the ingress; ``RouterHandle`` (the Router
  deployment seen from an ingress: requests gathered per call, token ids sent).
- ``ingress``: the ``RouterIngress`` deployment: FastAPI routes, the one endpoint
  wrapper (API key check, error responses, metrics), body limits, decision tokens,
  and the Python API for DeploymentHandle callers.
- ``openai_proxy``: ``/v1/chat/completions``: upstream calls, fallback, SSE relay, usage cost.
- ``admin``: ``/v1/admin/*``: security report, the learner's promotion gate, pin/unpin.
- ``replay_upstream``: the ``ReplayUpstream`` deployment.
- ``metrics``: Serve metrics (no-ops outside a replica) and replica ids.
- ``client``: ``RouterClient`` for in-cluster callers (DeploymentHandle).

Modules importable without Ray (the raw benchmark runs on a machine with only
torch and transformers):

- ``config``: ``RouterConfig`` (+ ``UpstreamConfig``, ``ReplayConfig``), ``resolve_placement``.
- ``core``: ``RouterCore``, the batched encoder + policy inference.
- ``tokens``: ``PromptTokenizer``, the encoder's tokenizer alone (token-id rows an ingress sends).
- ``protocol``: ``RouteRequest``, request parsing/validation shared by HTTP and the Python API,
  and the one error type / error envelope (``RequestError``, ``error_body``).
- ``feedback_endpoint``: ``/v1/feedback`` validation and the feedback actor's answers as HTTP.
- ``decision_sinks``: ``DECISION_SINKS`` registry and the durable local log;
  ``feedback_sink``: the "feedback-actor" sink.
- ``replay``: an OpenAI-compatible server answering with logged responses.
- ``http_client``: the documented client retry policy and an async HTTP client.
"""
