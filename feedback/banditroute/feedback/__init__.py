"""The feedback side: join rewards to decisions, durable event log, batches to the learner.

- ``join``: the pure join logic (window, first reward wins, duplicates, late, unknown).
- ``log``: the durable Parquet event/decision log (local folder or S3).
- ``batching``: size/max-delay batching and group commit.
- ``service``: FeedbackService (asyncio; join + log + learner delivery).
- ``actor``: the named, detached, restartable Ray actor around it.
- ``sink``: the "feedback-actor" decision sink for router replicas.
- ``http``: the ``POST /v1/feedback`` handler the Serve ingress calls.
"""
