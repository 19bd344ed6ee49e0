"""The identity policy learns online (issue 15 item 1): network from logged decisions, identities from feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import open_storage
from banditroute.learner.config import LearnerConfig
from banditroute.learner.identity_learner import IdentityLearner
from banditroute.learner.registry import learner_class, resume_or_start_learner
from banditroute.policy.checkpoint import policy_from_snapshot
from banditroute.policy.identity_policy import IdentityPolicy
from banditroute.policy.identity_train import train_identity_policy
from banditroute.policy.irt import fit_new_model_identity
from banditroute.policy.model_registry import ModelRegistry

from test_identity_policy import embed, make_data, small_config


@pytest.fixture(scope="module")
def base():
    full = make_data(n=300)
    data = full.select_models(["tiny", "coder", "mid", "big"])
    emb, enc_id, enc = embed(full)
    policy, _, _ = train_identity_policy(data, emb, small_config(), enc, enc_id)
    return policy, full, emb, enc_id


def live_policy(base, tmp_path) -> IdentityPolicy:
    """A copy of the trained policy whose registry lives at tmp_path/registry.json (as a deployment's)."""
    policy = base[0]
    uri = str(tmp_path / "registry.json")
    state = policy.state()
    state["meta"]["registry_uri"] = uri
    ModelRegistry.from_dict(state["registry"]).save(uri)
    return IdentityPolicy.from_state(state)


def logged(policy, data, emb, enc_id, rng, n=64, tag="", chosen=None):
    """n decisions of ``policy`` (explore), each revealed with the data's outcome of the chosen model."""
    rows = rng.integers(0, len(data), n)
    w = rng.uniform(0, 1, n)
    d = policy.decide(emb[rows], w, explore=True, generator=torch.Generator().manual_seed(int(rng.integers(1 << 30))))
    events = []
    for i, r in enumerate(rows):
        name = d.models[d.actions[i]] if chosen is None else chosen
        k = data.models.index(name)
        events.append(JoinedEvent(
            DecisionRecord(f"{tag}{i}", 0.0, emb[r].tolist(), float(w[i]), list(d.models), name,
                           float(d.propensities[i]) if chosen is None else 0.2, policy.policy_version, encoder_id=enc_id),
            float(data.scores[r, k]), float(data.costs[r, k]), 0.0))
    return events_to_table(events)


def test_registered_for_the_identity_kind_and_needs_the_live_registry(base):
    assert learner_class("identity") is IdentityLearner
    with pytest.raises(ValueError, match="meta.registry_uri"):
        IdentityLearner(base[0])


def test_network_trains_versions_step_by_one_and_replicas_get_the_weights(base, tmp_path):
    policy = live_policy(base, tmp_path)
    _, data, emb, enc_id = base
    learner = IdentityLearner(policy, LearnerConfig(replay_sample=64, identity={"refit_every": 1000}))
    before = {k: v.clone() for k, v in policy.network.state_dict().items()}
    rng = np.random.default_rng(0)
    v0 = policy.policy_version
    for step in range(5):
        m = learner.update(logged(policy, data, emb, enc_id, rng, tag=f"b{step}-"))
        assert m["updated"] and m["policy_version"] == v0 + step + 1 and m["events"] == 64
    changed = [k for k, v in policy.network.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(k.startswith("item_maps") for k in changed)  # the IRT item maps stay frozen
    replica = policy_from_snapshot(learner.snapshot())
    assert replica.policy_version == policy.policy_version
    assert replica.registry.path == policy.meta.registry_uri  # the replica reads the LIVE registry
    x = emb[:8]
    assert torch.allclose(replica.logits(x, 0.3), policy.logits(x, 0.3))


def test_events_map_to_the_pool_by_name_and_unknown_models_are_skipped(base, tmp_path):
    policy = live_policy(base, tmp_path)
    _, data, emb, enc_id = base
    learner = IdentityLearner(policy, LearnerConfig(identity={"refit_every": 1000}))
    rng = np.random.default_rng(1)
    table = logged(policy, data, emb, enc_id, rng, n=16, chosen="newcomer")  # not in the pool
    m = learner.update(table)
    assert not m["updated"] and m["skipped"] == {"unknown_model": 16}
    # another writer (the pool admin) retires "big": replayed rows that chose it drop out, the rest train
    learner.update(logged(policy, data, emb, enc_id, rng, n=32, chosen="big", tag="x"))
    other = ModelRegistry.load(policy.meta.registry_uri)
    other.retire("big")
    policy.registry.refresh()
    assert "big" not in policy.models
    m = learner.update(logged(policy, data, emb, enc_id, rng, n=32, tag="y"))
    assert m["updated"] and m["batch_rows"] >= 32


def test_identities_refined_from_feedback_leave_the_fresh_band_and_reach_other_readers(base, tmp_path):
    policy = live_policy(base, tmp_path)
    _, data, emb, enc_id = base
    k = data.models.index("newcomer")
    # onboarded from a 6-prompt quiz it failed: it looks weak and is fresh (n_observations 6 < 100)
    quiz_rows = np.arange(6)
    mu, sigma = fit_new_model_identity(policy.network.item_maps, emb[quiz_rows], np.zeros(6), policy.meta.irt)
    policy.registry.add("newcomer", 0.001, mu, sigma, n_observations=6, source="quiz")
    version_before = policy.registry.version
    p_before = float(policy.probabilities(emb[:100], 0.0, ["newcomer"] + ["tiny"])["newcomer"].mean())

    learner = IdentityLearner(policy, LearnerConfig(identity={"refit_every": 3}))
    rng = np.random.default_rng(2)
    for step in range(3):  # feedback for the newcomer: its true (strong) outcomes
        m = learner.update(logged(policy, data, emb, enc_id, rng, n=60, chosen="newcomer", tag=f"n{step}-"))
    assert m["identities_refitted"] == ["newcomer"]
    entry = policy.registry.get("newcomer")
    assert entry.n_observations == 6 + 180 and entry.source == "quiz"
    assert policy.registry.version == version_before + 1
    reader = ModelRegistry.load(policy.meta.registry_uri)  # what replicas and the pool admin read
    assert reader.get("newcomer").mu == entry.mu and reader.version == policy.registry.version
    # the refined identity predicts the newcomer's real strength: it now wins against "tiny" at w = 0
    p_after = float(policy.probabilities(emb[:100], 0.0, ["newcomer", "tiny"])["newcomer"].mean())
    assert p_after > p_before + 0.2
    assert np.mean(entry.sigma) < np.mean(sigma)  # more evidence: a narrower posterior


def test_refit_keeps_an_admin_change_made_meanwhile(base, tmp_path):
    policy = live_policy(base, tmp_path)
    _, data, emb, enc_id = base
    learner = IdentityLearner(policy, LearnerConfig(identity={"refit_every": 1}))
    rng = np.random.default_rng(3)
    admin = ModelRegistry.load(policy.meta.registry_uri)
    admin.set_price("mid", 0.5)  # the pool admin, in another process, between two reads of the learner
    admin.add("coder", 0.0002, [0.0, 0.0], [1.0, 1.0], n_observations=5, replace=True)  # re-onboarded
    m = learner.update(logged(policy, data, emb, enc_id, rng, n=64, chosen="coder", tag="c"))
    stored = ModelRegistry.load(policy.meta.registry_uri)
    assert stored.get("mid").price == 0.5  # not undone by the refit's write
    assert stored.get("coder").n_observations >= 5


def test_checkpoint_resume_and_the_checkpoint_does_not_rewrite_the_registry(base, tmp_path):
    policy = live_policy(base, tmp_path)
    _, data, emb, enc_id = base
    storage = open_storage(str(tmp_path / "ckpt"))
    learner = IdentityLearner(policy, LearnerConfig(identity={"refit_every": 1000}))
    learner.update(logged(policy, data, emb, enc_id, np.random.default_rng(4)))
    admin = ModelRegistry.load(policy.meta.registry_uri)
    admin.set_price("tiny", 0.25)  # newer than the learner's copy
    learner.save_checkpoint(storage)
    assert ModelRegistry.load(policy.meta.registry_uri).get("tiny").price == 0.25
    resumed = resume_or_start_learner(storage, None, LearnerConfig())
    assert isinstance(resumed, IdentityLearner) and resumed.policy_version == learner.policy_version
    assert resumed.policy.registry.get("tiny").price == 0.25
    policy.registry.refresh()
    x = emb[:4]
    assert torch.allclose(resumed.policy.logits(x, 0.2), policy.logits(x, 0.2), atol=1e-6)


def test_a_stale_writer_lands_its_change_on_top_of_a_newer_document(base, tmp_path):
    """The race that lost an onboarding live: the pool admin's slow quiz vs the learner's identity writes."""
    policy = live_policy(base, tmp_path)
    slow = ModelRegistry.load(policy.meta.registry_uri)  # read before the other writer's change
    fast = ModelRegistry.load(policy.meta.registry_uri)
    fast.update_identities({"tiny": ([0.5, 0.5], [0.3, 0.3], 999, fast.get("tiny").added_at)})
    slow.add("newcomer", 0.001, [0.0, 0.0], [1.0, 1.0], n_observations=5)  # computed against the older document
    fast.set_price("mid", 0.123)  # the fast writer's copy had the same version number as slow's write
    stored = ModelRegistry.load(policy.meta.registry_uri)
    assert "newcomer" in stored and stored.get("tiny").n_observations == 999 and stored.get("mid").price == 0.123
    assert stored.version == policy.registry.version + 3
