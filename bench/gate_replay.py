"""Is the promotion gate right? Replay a logged `banditroute up` run's events offline and check each decision.

    python bench/gate_replay.py RUN_OUT --estimator switch_dr      # RUN_OUT = an `up --out` folder (static encoder)
    python bench/gate_replay.py RUN_OUT --estimator dr
    python bench/gate_replay.py RUN_OUT --estimator switch_dr --decompose   # also: where the estimate's error lives

The run's joined events (RUN_OUT/storage/run-*/events, in reward-time
order, `--batch` per update as `up` delivers them) go into a fresh cold-start
learner of `--kind` with the learner actor's gate logic (hold-out split,
HoldoutBuffer, the recent training events for the reward model,
evaluate_candidate, DriftGuard re-bases). At every check it prints the
gate's estimate of V(candidate) - V(serving) and the TRUE difference: both
policies' served (explore, bounded) distributions scored on every prompt of
the data with the full outcome table (w_cost ~ U[0, 1], seed 0). The last
line: mean gate estimate vs mean true difference, and the true value of the
finally served and candidate versions. Issue 13, round 2
(docs/online_learning.md, "Why the gate held the value learner").
`--decompose` (round 3) adds, per check, the true difference on the gate's
own held-out events (prompts looked up by prompt_sha256 in the outcome
table, at each event's logged w_cost) and the (switch_)dr estimate split
into its reward-model part and its IPS-correction part.
"""
import glob, numpy as np, torch, argparse
torch.set_num_threads(1)
from banditroute.feedback.log import read_event_log
from banditroute.core.data import load_routing_data
from banditroute.policy.encoders import make_encoder
from banditroute.learner.promotion import evaluate_candidate, split_holdout, HoldoutBuffer
from banditroute.learner.ope import served_probabilities
from banditroute.learner.config import LearnerConfig
from banditroute.learner.registry import make_learner
from banditroute.learner.drift import DriftGuard
from banditroute.cluster.cold_start import starting_policy, ColdStartConfig
from banditroute.policy.checkpoint import policy_from_snapshot

ap = argparse.ArgumentParser()
ap.add_argument('run'); ap.add_argument('--data', default='../shared/data/routerbench/train.parquet'); ap.add_argument('--batch', type=int, default=6); ap.add_argument('--set', action='append', default=[])
ap.add_argument('--kind', default='value'); ap.add_argument('--decompose', action='store_true'); ap.add_argument('--estimator', default='dr'); ap.add_argument('--rebase', type=int, default=5)
a = ap.parse_args()
root = glob.glob(f'{a.run}/storage/run-*')[0]
ev = read_event_log(root)
ev = ev.sort_by('reward_time')
data = load_routing_data(a.data)
pol = starting_policy(data, ColdStartConfig(kind=a.kind, encoder='static'), seed=0)
overrides = {}
for s in a.set:
    k, v = s.split('='); overrides[k] = float(v) if '.' in v or 'e' in v else int(v)
cfg = LearnerConfig(rebase_after_held_checks=a.rebase)
for k, v in overrides.items():
    obj = cfg
    parts = k.split('.')
    for p in parts[:-1]: obj = getattr(obj, p)
    setattr(obj, parts[-1], v)
cfg.promotion.estimator = a.estimator
learner = make_learner(pol, cfg)
enc = make_encoder(pol.meta.encoder)
X = enc.encode(data.prompts).astype(np.float32)
W = np.random.default_rng(0).uniform(0, 1, size=(len(X),)).astype(np.float32)
idx = [data.model_index(m) for m in pol.models]
R = (1 - W)[:, None] * data.scores_filled[:, idx] - W[:, None] * np.minimum(data.costs[:, idx] / pol.tau, 1)
mask = np.ones_like(R, dtype=bool)
def true(p):
    pe = served_probabilities(p, X, W, mask, np.ones(len(X), bool), 0.01, 0.98)
    return float((pe * R).sum(1).mean())
clone = lambda p: policy_from_snapshot(p.snapshot())
from banditroute.serve.core import prompt_sha256
from banditroute.learner.ope import prepare_logged_data, estimate_terms
from banditroute.core.records import EventBatch
row_of = {prompt_sha256(t): i for i, t in enumerate(data.prompts)}
S, C = data.scores_filled[:, idx], np.minimum(data.costs[:, idx] / pol.tau, 1)

def decompose(holdout, cand, serv, extra):
    """Where the gate's error on V(cand) - V(serv) comes from, on the held-out events themselves (outcome table = truth)."""
    b = EventBatch.from_table(holdout)
    d = prepare_logged_data(b, cand, l2=gate.reward_model_l2, reward_model_events=EventBatch.from_table(extra) if extra is not None else None)
    rows = np.array([row_of[h] for h in holdout.column('prompt_sha256').to_pylist()])[d.rows]
    Rt = (1 - d.w)[:, None] * S[rows] - d.w[:, None] * C[rows]  # true expected reward per model at the logged w
    ex = np.array([m != 'greedy' for m in holdout.column('mode').to_pylist()])[d.rows]
    pc, ps = (served_probabilities(p, d.x, d.w.astype(np.float32), d.mask, ex, 0.01, 0.98) for p in (cand, serv))
    dp = pc - ps
    true_d = (dp * Rt).sum(1)
    dm_d = (dp * d.q).sum(1)
    i = np.arange(len(d.rows)); rc, rs = pc[i, d.actions] / d.mu, ps[i, d.actions] / d.mu
    mw = gate.switch_max_weight if a.estimator == 'switch_dr' else np.inf  # switch_dr drops each policy's own big weights
    sw = (rc > mw) | (rs > mw)
    corr = (np.where(rc > mw, 0, rc) - np.where(rs > mw, 0, rs)) * (d.rewards - d.q_logged)
    dis = np.abs(dp).sum(1) > 0.5  # rows where the two argmaxes differ
    qerr = d.q - Rt
    parts.append((true_d.mean(), dm_d.mean(), corr.mean()))
    print(f'   decomp: n {len(i)} disagree {dis.mean():.3f} switched {sw.mean():.3f} | true diff on holdout {true_d.mean():+.4f} '
          f'DM {dm_d.mean():+.4f} corr {corr.mean():+.4f} | q error at cand argmax on disagree rows {qerr[i, pc.argmax(1)][dis].mean():+.4f} '
          f'at serv argmax {qerr[i, ps.argmax(1)][dis].mean():+.4f}', flush=True)
serving = clone(learner.policy)
hb = HoldoutBuffer(2000); tb = HoldoutBuffer(max(cfg.promotion.reward_model_events, 2)); drift = DriftGuard(cfg.rebase_after_held_checks)
gate = cfg.promotion
n = len(ev); done = 0; vals = []; parts = []
print('best fixed', R.mean(0).max())
for start in range(0, n, a.batch):
    b = ev.slice(start, a.batch)
    tr, ho = split_holdout(b, gate.holdout_fraction); hb.add(ho); tb.add(tr) if gate.reward_model_events else None
    m = learner.update(tr)
    if m.get('updated') and learner.updates % gate.every_updates == 0:
        d = evaluate_candidate(hb.table(), learner.policy, serving, gate, tb.table() if gate.reward_model_events else None)
        tc, ts = true(learner.policy), true(serving)
        diff = d.difference['value'] if d.difference else float('nan')
        lb = d.difference['lower_bound'] if d.difference else float('nan')
        se = d.difference['se'] if d.difference else float('nan')
        vals.append((diff, tc - ts))
        if a.decompose and hb.table() is not None and len(hb) >= gate.min_holdout_events:
            decompose(hb.table(), learner.policy, serving, tb.table() if gate.reward_model_events else None)
        print(f'ev {start+a.batch:5d} cand v{learner.policy_version} serv v{serving.policy_version} gate {diff:+.4f} se {se:.4f} lb {lb:+.4f} '
              f'true cand {tc:.4f} serv {ts:.4f} diff {tc-ts:+.4f} {"PROMOTE" if d.promote else "hold"}', flush=True)
        if d.promote:
            drift.promoted(); serving = clone(learner.policy)
        elif drift.held(d.difference is not None):
            learner.rebase(serving); print('   rebase')
v = np.array([x for x in vals if np.isfinite(x[0])])
print('mean gate diff', v[:,0].mean(), 'mean true diff', v[:,1].mean(), 'final serving true', true(serving), 'final cand true', true(learner.policy))
if parts:
    p = np.array(parts)
    print('decomposition, mean over checks: true diff on the held-out events', p[:, 0].mean(), 'reward-model part', p[:, 1].mean(),
          'IPS-correction part', p[:, 2].mean())
