"""The learner side: RLlib-style policy module and learner, parameter server, OPE, the `up` loop.

- ``module``: BarpRLModule, the BaRP network as an RLlib TorchRLModule.
- ``learner``: BanditTorchLearner (RLlib TorchLearner, off-policy REINFORCE loss hook),
  OnlineLearner (events -> updates, versions, replay, checkpoints), LearnerConfig.
- ``checkpoint``: versioned, manifest-committed checkpoints in storage (local or S3).
- ``actor``: the named, detached, restartable learner actor.
- ``param_server``: the parameter server replicas long-poll for new weights.
- ``ope``: off-policy evaluation (IPS, SNIPS, doubly robust) with standard errors.
- ``loop``: `banditroute up` (the whole loop with a replay traffic driver).
"""
