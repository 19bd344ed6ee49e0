"""The RLlib-based learner without a Ray cluster: learning, versions, checkpoints, the RLModule API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from banditroute.learner.checkpoint import list_checkpoints
from banditroute.learner.config import LearnerConfig
from banditroute.learner.learner import OnlineLearner, events_to_rows, optimizer_state_from_bytes, optimizer_state_to_bytes
from banditroute.learner.module import BarpRLModule
from banditroute.policy.barp import BarpPolicy, NetworkConfig, PolicyMeta
from banditroute.policy.exploration import ExplorationBounds
from banditroute.policy.encoders import EncoderConfig, make_encoder
from banditroute.policy.reward import fit_tau, reward
from banditroute.core.records import DecisionRecord, JoinedEvent, events_to_table
from banditroute.core.storage import open_storage
from banditroute.testkit.synthetic import make_routing_data

ENC = EncoderConfig(name="hashing", dim=64)


@pytest.fixture(scope="module")
def problem():
    data = make_routing_data(300, seed=0)
    encoder = make_encoder(ENC)
    return data, encoder.encode(data.prompts), encoder.encoder_id


def new_policy(data, emb, encoder_id, seed=0) -> BarpPolicy:
    torch.manual_seed(seed)
    meta = PolicyMeta(models=list(data.models), tau=fit_tau(data.costs), embed_dim=emb.shape[1], encoder=ENC,
                      encoder_id=encoder_id, network=NetworkConfig(hidden_dim=64, preference_dim=16))
    return BarpPolicy(meta)


def logged_batch(policy, data, emb, encoder_id, rng, gen, n=32, tag="") -> tuple[object, np.ndarray]:
    """Route n random prompts with the policy (explore), reveal the chosen model's logged outcome."""
    rows = rng.integers(0, len(data), n)
    w = rng.uniform(0, 1, n)
    d = policy.decide(emb[rows], w, explore=True, generator=gen)
    events = [
        JoinedEvent(
            DecisionRecord(f"{tag}{i}", 0.0, emb[r].tolist(), float(w[i]), list(data.models), data.models[d.actions[i]],
                           float(d.propensities[i]), policy.policy_version, encoder_id=encoder_id),
            float(data.scores_filled[r, d.actions[i]]), float(data.costs[r, d.actions[i]]), 0.0,
        )
        for i, r in enumerate(rows)
    ]
    return events_to_table(events), rows


def greedy_value(policy, data, emb, seed=1) -> float:
    w = np.random.default_rng(seed).uniform(0, 1, len(data))
    d = policy.decide(emb, w, explore=False)
    r = reward(data.scores_filled, data.costs, w[:, None], policy.tau)
    return float(r[np.arange(len(data)), d.actions].mean())


def test_online_updates_raise_the_reward_and_versions_are_monotonic(problem):
    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    before = greedy_value(policy, data, emb)
    learner = OnlineLearner(policy, LearnerConfig(learning_rate=1e-3))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    versions = [learner.policy_version]
    for step in range(120):
        table, _ = logged_batch(policy, data, emb, enc_id, rng, gen, tag=f"{step}-")
        metrics = learner.update(table)
        assert metrics["updated"] and metrics["policy_version"] == versions[-1] + 1
        versions.append(metrics["policy_version"])
    after = greedy_value(policy, data, emb)
    random_level = float(reward(data.scores_filled, data.costs, np.random.default_rng(1).uniform(0, 1, len(data))[:, None], policy.tau).mean())
    assert after > before + 0.1 and after > random_level + 0.1, (before, after, random_level)
    assert versions == list(range(0, 121))
    for key in ("policy_loss", "value_loss", "entropy", "mean_importance_weight", "effective_sample_size"):
        assert np.isfinite(metrics[key]), key
    # The snapshot is the same weights format replicas load.
    snap = learner.snapshot()
    served = BarpPolicy.from_snapshot(snap)
    assert served.policy_version == snap.policy_version == 120
    assert np.allclose(served.logits(emb[:5], 0.3).numpy(), policy.logits(emb[:5], 0.3).numpy(), atol=1e-6)


def test_off_policy_weights_use_the_logged_propensity(problem):
    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    learner = OnlineLearner(policy, LearnerConfig(importance_clip=2.0, replay_sample=0))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    table, _ = logged_batch(policy, data, emb, enc_id, rng, gen)
    # Pretend a much more confident logger chose these (tiny propensities): weights hit the clip.
    table = table.set_column(table.schema.get_field_index("probability"), "probability",
                             __import__("pyarrow").array([0.01] * table.num_rows, __import__("pyarrow").float64()))
    metrics = learner.update(table)
    assert metrics["clipped_fraction"] == pytest.approx(1.0)
    assert metrics["mean_importance_weight"] == pytest.approx(2.0)


def test_invalid_events_are_skipped_and_counted(problem):
    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    good = DecisionRecord("g", 0.0, emb[0].tolist(), 0.5, list(data.models), data.models[0], 0.5, 0, encoder_id=enc_id)
    unknown = DecisionRecord("u", 0.0, emb[0].tolist(), 0.5, ["gpt-9"], "gpt-9", 0.5, 0, encoder_id=enc_id)
    other_enc = DecisionRecord("o", 0.0, emb[0].tolist(), 0.5, list(data.models), data.models[0], 0.5, 0, encoder_id="minilm-x")
    rows = events_to_rows(events_to_table([JoinedEvent(d, 1.0, 0.0, 0.0) for d in (good, unknown, other_enc)]), policy)
    assert len(rows) == 1 and rows.skipped == {"unknown_model": 1, "encoder_mismatch": 1}
    learner = OnlineLearner(policy)
    empty = learner.update(events_to_table([JoinedEvent(unknown, 1.0, 0.0, 0.0)]))
    assert empty["updated"] is False and learner.policy_version == 0


def test_checkpoint_resume_keeps_weights_and_never_goes_back(problem, tmp_path):
    data, emb, enc_id = problem
    storage = open_storage(str(tmp_path)).child("checkpoints")
    policy = new_policy(data, emb, enc_id)
    learner = OnlineLearner(policy, LearnerConfig(keep_checkpoints=2))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for step in range(5):
        learner.update(logged_batch(policy, data, emb, enc_id, rng, gen, tag=f"{step}-")[0])
        learner.save_checkpoint(storage)
    assert list_checkpoints(storage) == [4, 5]  # pruned to the newest 2
    # A restarted learner (even one handed an older initial policy) resumes at v5 with the same weights.
    resumed = OnlineLearner.resume_or_start(storage, new_policy(data, emb, enc_id, seed=3))
    assert resumed.policy_version == 5
    assert np.allclose(resumed.policy.logits(emb[:4], 0.2).numpy(), policy.logits(emb[:4], 0.2).numpy(), atol=1e-6)
    resumed.update(logged_batch(resumed.policy, data, emb, enc_id, rng, gen, tag="r-")[0])
    assert resumed.policy_version == 6
    resumed.ensure_version_at_least(3)
    assert resumed.policy_version == 6
    resumed.ensure_version_at_least(40)  # e.g. the parameter server already serves v40
    resumed.update(logged_batch(resumed.policy, data, emb, enc_id, rng, gen, tag="s-")[0])
    assert resumed.policy_version == 41
    # An incomplete checkpoint (no manifest) is ignored.
    storage.write_bytes("v000000000099/policy.pt", b"partial")
    assert list_checkpoints(storage)[-1] == 5


def test_a_checkpoint_version_is_its_meta_json(problem, tmp_path):
    """The version is read from meta.json (the manifest no longer repeats it); a folder named for other weights is refused."""
    from banditroute.learner.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from banditroute.learner.learner import mint_version

    data, emb, enc_id = problem
    storage = open_storage(str(tmp_path)).child("checkpoints")
    policy = new_policy(data, emb, enc_id)
    mint_version(policy, 7)
    save_checkpoint(storage, policy, extra={"promoted": True})
    loaded, _, manifest = load_checkpoint(storage, 7)
    assert loaded.policy_version == 7 and "policy_version" not in manifest and read_manifest(storage, 7)["promoted"]
    # A checkpoint written before the manifest stopped repeating the version still loads.
    storage.write_json("v000000000007/manifest.json", {**manifest, "policy_version": 7})
    assert load_checkpoint(storage, 7)[0].policy_version == 7
    # Weights of v7 under the name v8: their version is not what the folder says.
    for name in ("policy.pt", "meta.json", "manifest.json"):
        storage.write_bytes(f"v000000000008/{name}", storage.read_bytes(f"v000000000007/{name}"))
    with pytest.raises(ValueError, match="meta.json holds v7, not v8"):
        load_checkpoint(storage, 8)


def test_rl_module_entry_points(problem):
    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    module = BarpRLModule.from_meta(policy.meta)
    module.set_state(policy.state()["weights"])
    batch = {"obs": emb[:6], "w_cost": np.full(6, 0.3, np.float32), "mask": np.tile([True, False, True], (6, 1))}
    explore = module.forward_exploration(batch)
    greedy = module.forward_inference(batch)
    train = module.forward_train(batch)
    assert set(explore["actions"].tolist()) <= {0, 2} and (explore["action_prob"] > 0).all()
    assert torch.equal(greedy["actions"], greedy["probs"].argmax(-1)) and (greedy["action_prob"] == 1).all()
    assert train["action_dist_inputs"].requires_grad and train["vf_preds"].shape == (6,)
    assert set(module.get_state()) == set(policy.network.state_dict())


def test_rl_module_explores_like_a_replica(problem):
    """forward_exploration is policy.decide.decide: the module's exploration bounds hold, the propensity is the bounded one."""
    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    with torch.no_grad():  # a sharp policy, so the bounds bind
        policy.network.decision_head.weight.zero_()
        policy.network.decision_head.bias.copy_(torch.tensor([30.0, 0.0, -30.0]))
    module = BarpRLModule.from_meta(policy.meta, ExplorationBounds(0.1, 0.7))
    module.set_state(policy.state()["weights"])
    batch = {"obs": emb[:64], "w_cost": np.full(64, 0.3, np.float32), "mask": np.tile([True, False, True], (64, 1))}
    out = module.forward_exploration(batch)
    probs = out["probs"]
    assert torch.allclose(probs[:, [0, 2]], torch.tensor([0.7, 0.3]).expand(64, 2), atol=1e-5) and (probs[:, 1] == 0).all()
    assert torch.equal(out["action_prob"], probs.gather(1, out["actions"].unsqueeze(1)).squeeze(1))
    assert BarpRLModule.from_meta(policy.meta).bounds == ExplorationBounds()  # default: the serving bounds


def test_events_answered_by_a_fallback_model_are_not_credited_to_the_chosen_one():
    from banditroute.learner.ope import prepare_logged_data
    from banditroute.core.records import EventBatch

    enc_cfg = EncoderConfig(name="hashing", dim=16)
    meta = PolicyMeta(models=["a", "b"], tau=1.0, embed_dim=16, encoder=enc_cfg, encoder_id="",
                      network=NetworkConfig(hidden_dim=8, preference_dim=4))
    policy = BarpPolicy(meta)
    events = [
        JoinedEvent(DecisionRecord(f"d{i}", 0.0, [0.1] * 16, 0.5, ["a", "b"], "a", 0.5, 0,
                                   served_model=served), 1.0, 0.01, 1.0)
        for i, served in enumerate([None, "a", "b", "b"])
    ]
    table = events_to_table(events)
    rows = events_to_rows(table, policy)
    assert len(rows) == 2 and rows.skipped == {"fallback_served": 2}
    assert prepare_logged_data(EventBatch.from_table(table), policy).rows.tolist() == [0, 1]


class _RunsCode:
    """A pickle payload that would run code when unpickled."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_optimizer_state_is_saved_without_pickled_objects_and_resumes_adam(problem, tmp_path):
    import io
    import pickle

    from banditroute.learner.checkpoint import LEGACY_PICKLE_STATE_FILE, load_checkpoint, save_checkpoint

    data, emb, enc_id = problem
    policy = new_policy(data, emb, enc_id)
    learner = OnlineLearner(policy, LearnerConfig(learning_rate=1e-3))
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for step in range(3):
        learner.update(logged_batch(policy, data, emb, enc_id, rng, gen, tag=f"{step}-")[0])
    blob = learner.optimizer_state_bytes()
    # Only tensors and plain containers: the restricted unpickler accepts it ...
    state = optimizer_state_from_bytes(blob)
    moments = [v for group in state.values() for p in group["state"]["state"].values() for v in p.values() if torch.is_tensor(v)]
    assert moments and any(float(m.abs().sum()) > 0 for m in moments)
    # ... and a resumed learner continues with the same Adam moments.
    storage = open_storage(str(tmp_path)).child("checkpoints")
    learner.save_checkpoint(storage)
    resumed = OnlineLearner.resume_or_start(storage, new_policy(data, emb, enc_id, seed=3))
    again = optimizer_state_from_bytes(resumed.optimizer_state_bytes())
    first = next(iter(state.values()))["state"]["state"]
    second = next(iter(again.values()))["state"]["state"]
    assert all(torch.equal(first[k]["exp_avg"], second[k]["exp_avg"]) for k in first)
    # Bytes holding an arbitrary object are refused, not executed.
    evil = io.BytesIO()
    torch.save({"x": _RunsCode()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        optimizer_state_from_bytes(evil.getvalue())
    # A legacy checkpoint whose optimizer state is a pickle loads its weights, never the pickle.
    legacy = open_storage(str(tmp_path / "legacy")).child("checkpoints")
    save_checkpoint(legacy, policy, learner_state=None)
    folder = f"v{policy.policy_version:012d}"
    legacy.write_bytes(f"{folder}/{LEGACY_PICKLE_STATE_FILE}", pickle.dumps(_RunsCode()))
    manifest = legacy.read_json(f"{folder}/manifest.json")
    legacy.write_json(f"{folder}/manifest.json", dict(manifest, files=manifest["files"] + [LEGACY_PICKLE_STATE_FILE]))
    loaded, learner_state, _ = load_checkpoint(legacy, policy.policy_version)
    assert learner_state is None and loaded.policy_version == policy.policy_version
