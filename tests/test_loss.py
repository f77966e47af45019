"""
Tests for loss.py against hand-computed values and independent autograd computations (CPU, ~1 s).
Run: python -m pytest -q tests/test_loss.py
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import (dpo_loss, group_advantages, grpo_loss, informative_groups, loss_norm, sampler_mismatch, seq_logp,
                  token_logp)

torch.set_num_threads(1)
AGGS = ["seq_mean", "token_mean", "const"]


class TinyPolicy(torch.nn.Module):
    """A random linear 'LM head' on fixed random features: real parameters, real token log-probs."""
    def __init__(self, D=8, V=11, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.head = torch.nn.Linear(D, V)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(V, D, generator=g))
            self.head.bias.copy_(torch.randn(V, generator=g))

    def forward(self, x, ids):
        return token_logp(self.head(x), ids) # (B, T)


def ragged_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float() # (B, T)


def grads(f, params):
    return torch.autograd.grad(f, params)


# -----------------------------------------------------------------------------
# advantages

def test_two_grpo_advantage_conventions():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0]) # two mixed pairs
    assert group_advantages(r, 2, eps=0.0).tolist() == [1.0, -1.0, -1.0, 1.0] # Eq. 14, exact
    assert torch.allclose(group_advantages(r, 2), torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    s = 1 / math.sqrt(2)
    assert torch.allclose(group_advantages(r, 2, unbiased=True), torch.tensor([s, -s, -s, s]), atol=1e-5)
    assert group_advantages(r, 2, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5] # Dr. GRPO


def test_equal_groups_exactly_zero():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.3, 0.3, 1.0, 0.0]) # three uniform pairs, one mixed
    for kw in [{}, {"unbiased": True}, {"scale": "none"}, {"eps": 0.0}]:
        adv = group_advantages(r, 2, **kw)
        assert (adv[:6] == 0).all() and adv[6] > 0 and adv[7] < 0
    for v in [0.0, 1.0, 0.1]:
        for kw in [{}, {"unbiased": True}, {"eps": 0.0}]:
            assert (group_advantages(torch.full((32,), v), 16, **kw) == 0).all() # k=16 all-equal
    assert informative_groups(r, 2).tolist() == [False, False, False, True]
    assert informative_groups(torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]), 4).tolist() == [True, False]


def test_bad_group_size_raises():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        informative_groups(torch.zeros(7), 4)


@pytest.mark.parametrize("n_pos", [1, 2, 4, 8, 12, 15])
def test_binary_rewards_match_eq21(n_pos):
    k, p = 16, n_pos / 16
    r = torch.zeros(k, dtype=torch.float64)
    r[torch.randperm(k, generator=torch.Generator().manual_seed(n_pos))[:n_pos]] = 1.0
    adv = group_advantages(r, k, eps=1e-12)
    assert torch.allclose(adv[r == 1], torch.full((n_pos,), math.sqrt((1 - p) / p), dtype=torch.float64))
    assert torch.allclose(adv[r == 0], torch.full((k - n_pos,), -math.sqrt(p / (1 - p)), dtype=torch.float64))
    # verl's Bessel std: A+ = (1-p) / sqrt(16/15 p(1-p))
    adv_u = group_advantages(r, k, unbiased=True, eps=1e-12)
    assert math.isclose(adv_u[r == 1][0].item(), (1 - p) / math.sqrt(16 / 15 * p * (1 - p)), rel_tol=1e-9)


def test_groups_are_contiguous():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]) # k=4: p=1/4 then p=3/4
    adv = group_advantages(r, 4, eps=0.0)
    a, b = math.sqrt(3), 1 / math.sqrt(3)
    assert torch.allclose(adv, torch.tensor([a, -b, -b, -b, b, b, -a, b]))


# -----------------------------------------------------------------------------
# GRPO loss

def test_loss_norm_values():
    mask = ragged_mask([3, 1, 4], 5)
    assert loss_norm(mask, "seq_mean") == 3.0
    assert loss_norm(mask, "token_mean") == 8.0
    assert loss_norm(mask, "const", max_len=5) == 15.0
    with pytest.raises(ValueError):
        loss_norm(mask, "const")
    with pytest.raises(ValueError):
        loss_norm(mask, "sum")


def test_zero_variance_groups_no_loss_no_grad():
    g = torch.Generator().manual_seed(1)
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2)
    logp = (-torch.rand(4, 6, generator=g)).requires_grad_() # (B, T)
    old_logp = logp.detach() + 0.3 * torch.randn(4, 6, generator=g) # off-policy, some ratios clipped
    ref_logp = logp.detach() + 0.5
    mask = ragged_mask([6, 2, 4, 5], 6)
    for agg in AGGS:
        loss, _ = grpo_loss(logp, old_logp, adv, mask, agg=agg, max_len=6, ref_logp=ref_logp, kl_coef=0.0)
        (gr,) = grads(loss, [logp])
        assert loss.item() == 0.0 and (gr == 0).all()
    # with a KL term the same groups do get a gradient (why the trainer keeps kl_coef=0 to drop them)
    loss, _ = grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, kl_coef=0.1)
    assert grads(loss, [logp])[0].abs().sum() > 0


def test_two_grpo_on_policy_gradient_eq14():
    policy = TinyPolicy()
    params = list(policy.parameters())
    g = torch.Generator().manual_seed(2)
    T = 7
    x = torch.randn(2, T, 8, generator=g) # (B, T, D)
    ids = torch.randint(0, 11, (2, T), generator=g) # (B, T)
    mask = ragged_mask([7, 3], T) # o+ longer than o-
    adv = group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0) # (+1, -1)
    logp = policy(x, ids) # (B, T)
    loss, m = grpo_loss(logp, logp.detach(), adv, mask, agg="seq_mean")
    g_loss = grads(loss, params)
    # Eq. 14 on-policy: grad J = 1/2 (grad mean_t log pi(o+) - grad mean_t log pi(o-)), J = -loss
    logp = policy(x, ids)
    mean_pos = (logp[0] * mask[0]).sum() / 7
    mean_neg = (logp[1] * mask[1]).sum() / 3
    g_ref = grads(0.5 * (mean_pos - mean_neg), params)
    for a, b in zip(g_loss, g_ref):
        assert torch.allclose(-a, b, atol=1e-6)
    assert abs(m["ratio_mean"].item() - 1.0) < 1e-6 and m["clipfrac_low"] == 0 and m["clipfrac_high"] == 0


def test_dpo_gradient_lemma_b1():
    policy = TinyPolicy(seed=3)
    params = list(policy.parameters())
    g = torch.Generator().manual_seed(4)
    T, beta = 6, 0.3
    x = torch.randn(2, T, 8, generator=g)
    ids = torch.randint(0, 11, (2, T), generator=g)
    mask = ragged_mask([6, 4], T) # row 0 = o+, row 1 = o-
    ref = torch.tensor([-14.0, -9.0]) # summed reference log-probs
    lp = seq_logp(policy(x, ids), mask) # (2,)
    loss, _ = dpo_loss(lp[:1], lp[1:], ref[:1], ref[1:], beta=beta)
    g_loss = grads(loss, params)
    # Lemma B.1: grad L = -beta sigmoid(r_hat(o-) - r_hat(o+)) (grad log pi(o+) - grad log pi(o-))
    with torch.no_grad():
        r_pos, r_neg = beta * (lp[0] - ref[0]), beta * (lp[1] - ref[1])
        c = beta * torch.sigmoid(r_neg - r_pos)
    g_pos = grads(seq_logp(policy(x, ids), mask)[0], params)
    g_neg = grads(seq_logp(policy(x, ids), mask)[1], params)
    for a, gp, gn in zip(g_loss, g_pos, g_neg):
        assert torch.allclose(a, -c * (gp - gn), atol=1e-6)


def test_clipping_direction_and_band():
    ratios = torch.tensor([0.5, 0.79, 0.9, 1.0, 1.1, 1.27, 1.5]) # band is [0.8, 1.28]
    T = len(ratios)
    logp = torch.full((2, T), -1.0, requires_grad=True) # row 0: A=+2, row 1: A=-2
    old_logp = logp.detach() - ratios.log() # (2, T)
    adv = torch.tensor([2.0, -2.0])
    mask = torch.ones(2, T)
    loss, m = grpo_loss(logp, old_logp, adv, mask, agg="seq_mean")
    (gr,) = grads(loss, [logp])
    # unclipped gradient of -A*ratio/T/B w.r.t. logp is -A*ratio/(T*B)
    unclipped = -adv[:, None] * ratios[None, :] / (T * 2)
    inside = (ratios >= 0.8) & (ratios <= 1.28)
    assert torch.allclose(gr[:, inside], unclipped[:, inside])
    # A>0: zero above 1+clip_high, untouched below 1-clip_low
    assert gr[0, -1] == 0 and torch.allclose(gr[0, :2], unclipped[0, :2])
    # A<0: zero below 1-clip_low (0.5 and 0.79), untouched above 1+clip_high
    assert (gr[1, :2] == 0).all() and torch.isclose(gr[1, -1], unclipped[1, -1])
    assert (gr[:, 2:-1] != 0).all()
    assert math.isclose(m["clipfrac_high"].item(), 1 / 14, rel_tol=1e-6) # (1.5, A>0)
    assert math.isclose(m["clipfrac_low"].item(), 2 / 14, rel_tol=1e-6) # (0.5, 0.79, A<0)
    assert math.isclose(m["ratio_min"].item(), 0.5, rel_tol=1e-6)
    assert math.isclose(m["ratio_max"].item(), 1.5, rel_tol=1e-6)
    # hand value of the loss: clipped tokens use the clip boundary
    surr = torch.stack([2 * ratios.clamp(max=1.28), -2 * ratios.clamp(min=0.8)])
    assert torch.isclose(loss, -surr.mean())


def reference_loss(logp, old_logp, adv, mask, agg, max_len):
    """Straight from the definitions, loop over sequences (independent of loss.py's weighting)."""
    total, ntok = 0.0, mask.sum()
    for i in range(logp.shape[0]):
        m = mask[i] > 0
        ratio = (logp[i][m] - old_logp[i][m]).exp()
        s = -torch.min(adv[i] * ratio, adv[i] * ratio.clamp(0.8, 1.28))
        if agg == "seq_mean":
            total = total + s.mean() / logp.shape[0]
        elif agg == "token_mean":
            total = total + s.sum() / ntok
        else:
            total = total + s.sum() / (logp.shape[0] * max_len)
    return total


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("split", [[2, 2], [1, 3], [3, 1], [1, 1, 1, 1]])
def test_micro_batch_invariance(agg, split):
    g = torch.Generator().manual_seed(5)
    B, T = 4, 9
    mask = ragged_mask([9, 2, 6, 4], T) # ragged!
    logp = (-3 * torch.rand(B, T, generator=g)).requires_grad_()
    old_logp = logp.detach() + 0.4 * torch.randn(B, T, generator=g)
    adv = torch.tensor([1.3, -0.7, 0.4, -1.0])
    norm = loss_norm(mask, agg, max_len=T)
    full, _ = grpo_loss(logp, old_logp, adv, mask, agg=agg, norm=norm)
    (g_full,) = grads(full, [logp])
    ref = reference_loss(logp, old_logp, adv, mask, agg, T)
    assert torch.isclose(full, ref, atol=1e-6)
    assert torch.isclose(full, grpo_loss(logp, old_logp, adv, mask, agg=agg, max_len=T)[0]) # norm=None
    micro, start = 0.0, 0
    for n in split:
        rows = slice(start, start + n)
        micro = micro + grpo_loss(logp[rows], old_logp[rows], adv[rows], mask[rows], agg=agg, norm=norm)[0]
        start += n
    (g_micro,) = grads(micro, [logp])
    assert torch.isclose(micro, full, atol=1e-6)
    assert torch.allclose(g_micro, g_full, atol=1e-7)


def test_local_norm_is_not_invariant():
    """Sanity check that the invariance test can fail: token_mean with per-micro-batch norms differs."""
    g = torch.Generator().manual_seed(6)
    mask = ragged_mask([9, 2, 6, 4], 9)
    logp, old = -torch.rand(4, 9, generator=g), -torch.rand(4, 9, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    full = grpo_loss(logp, old, adv, mask, agg="token_mean")[0]
    # usual gradient accumulation: average of per-micro-batch token means, rows split 1+3
    parts = [grpo_loss(logp[s], old[s], adv[s], mask[s], agg="token_mean")[0] for s in (slice(0, 1), slice(1, 4))]
    local = sum(parts) / 2
    assert not torch.isclose(full, local)


def test_k3_kl_to_reference():
    mask = torch.ones(1, 1)
    adv = torch.zeros(1) # isolate the KL term
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, m = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=torch.zeros(1, 1), kl_coef=0.1)
    assert loss.item() == 0.0 and m["kl_ref"].item() == 0.0
    for d in [0.5, -0.5, 2.0]: # d = ref - logp
        loss, m = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=torch.full((1, 1), d), kl_coef=0.1)
        kl = math.exp(d) - d - 1
        assert kl > 0 and math.isclose(m["kl_ref"].item(), kl, rel_tol=1e-6)
        assert math.isclose(loss.item(), 0.1 * kl, rel_tol=1e-6)
        (gr,) = grads(loss, [logp])
        assert math.isclose(gr.item(), 0.1 * (1 - math.exp(d)), rel_tol=1e-5) # d/dlogp of k3
    _, m = grpo_loss(logp, logp.detach(), adv, mask, ref_logp=torch.full((1, 1), 0.5))
    assert math.isclose(m["kl_ref"].item(), 0.148721, rel_tol=1e-5) # e^0.5 - 1.5, by hand


def test_approx_kl_metric():
    logp = torch.zeros(1, 2)
    old = torch.tensor([[0.0, -0.2]]) # log-ratios 0 and 0.2
    _, m = grpo_loss(logp, old, torch.ones(1), torch.ones(1, 2))
    assert math.isclose(m["approx_kl"].item(), (math.exp(0.2) - 1 - 0.2) / 2, rel_tol=1e-5)
    assert math.isclose(m["ratio_mean"].item(), (1 + math.exp(0.2)) / 2, rel_tol=1e-6)


# -----------------------------------------------------------------------------
# DPO

def test_dpo_zero_margin_is_log2():
    lp = torch.tensor([-5.0, -2.0, -9.0])
    for ls in [0.0, 0.2]:
        loss, m = dpo_loss(lp, lp, lp + 1, lp + 1, beta=0.1, label_smoothing=ls)
        assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    assert m["reward_acc"].item() == 0.0 and m["reward_margin"].item() == 0.0


def test_dpo_hand_values():
    # h = (-1 - -3) - (-2 - -2) = 2
    c, r, rc, rr = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    loss, m = dpo_loss(c, r, rc, rr, beta=0.5)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6) # -log sigmoid(1)
    loss, _ = dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.1)
    cdpo = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert math.isclose(loss.item(), cdpo, rel_tol=1e-6)
    loss, _ = dpo_loss(c, r, rc, rr, beta=0.1, ipo=True)
    assert math.isclose(loss.item(), (2 - 5) ** 2, rel_tol=1e-6)
    assert m["reward_acc"].item() == 1.0
    assert math.isclose(m["reward_chosen"].item(), 0.5) and math.isclose(m["reward_rejected"].item(), -0.5)
    assert math.isclose(m["reward_margin"].item(), 1.0)


def test_dpo_batch_mean_and_metrics():
    c = torch.tensor([-1.0, -4.0])
    r = torch.tensor([-2.0, -3.0])
    ref = torch.tensor([-2.0, -2.0])
    loss, m = dpo_loss(c, r, ref, ref, beta=1.0) # h = (1, -1)
    expect = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert math.isclose(loss.item(), expect, rel_tol=1e-6)
    assert m["reward_acc"].item() == 0.5 and m["reward_margin"].item() == 0.0


def test_seq_and_token_logp():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]]) # (1, 2, 2)
    ids = torch.tensor([[1, 0]])
    lp = token_logp(logits, ids)
    assert torch.allclose(lp, torch.tensor([[math.log(0.75), math.log(0.5)]]))
    assert torch.allclose(seq_logp(lp, torch.tensor([[1, 0]])), torch.tensor([math.log(0.75)]))
    assert torch.allclose(seq_logp(lp, torch.tensor([[True, True]])), torch.tensor([math.log(0.375)]))


# -----------------------------------------------------------------------------
# batch std, dual-clip, sampler mismatch and TIS

def test_batch_std_advantages():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0]) # one mixed pair, one uniform; batch std 0.433 (population) / 0.5 (Bessel)
    pop = math.sqrt(0.1875)
    assert torch.allclose(group_advantages(r, 2, scale="batch", eps=0.0), torch.tensor([0.5, -0.5, 0, 0]) / pop)
    assert group_advantages(r, 2, scale="batch", unbiased=True, eps=0.0).tolist() == [1.0, -1.0, 0.0, 0.0]
    # TRL's formula: (r - group mean) / (std of all rewards + eps), Bessel std
    trl = (r - r.view(-1, 2).mean(1).repeat_interleave(2)) / (r.std() + 1e-4)
    assert torch.allclose(group_advantages(r, 2, scale="batch", unbiased=True, eps=1e-4)[:2], trl[:2])
    # the std of a batch handed over in parts; a group-level std would give +-1 to both pairs
    two = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2, scale="batch", eps=0.0, batch_std=0.25)
    assert two.tolist() == [2.0, -2.0, 2.0, -2.0]
    with pytest.raises(ValueError, match="'batch'"):
        group_advantages(r, 2, scale="group")


def test_dual_clip_hand_values():
    ratios = torch.tensor([0.5, 2.0, 4.0, 10.0])
    logp = torch.full((2, 4), -1.0, requires_grad=True) # row 0: A=+1, row 1: A=-1
    old_logp = logp.detach() - ratios.log()
    adv, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    loss0, m0 = grpo_loss(logp, old_logp, adv, mask)
    loss, m = grpo_loss(logp, old_logp, adv, mask, dual_clip=3.0)
    (gr,) = grads(loss, [logp])
    # A<0 tokens at ratio 4 and 10 have loss max(r, clip(r)) = r > 3: capped at 3, zero gradient; ratio 2 untouched
    per_tok = torch.tensor([[-0.5, -1.28, -1.28, -1.28], [0.8, 2.0, 3.0, 3.0]])
    assert torch.isclose(loss, per_tok.mean(1).mean())
    assert (gr[1, 2:] == 0).all() and torch.isclose(gr[1, 1], torch.tensor(2.0 / 8))
    assert torch.equal(gr[0], grads(loss0, [logp])[0][0]) # A>0 unaffected
    assert math.isclose(m["clipfrac_dual"].item(), 2 / 8) and "clipfrac_dual" not in m0


def test_sampler_mismatch_hand_values():
    s = torch.tensor([[-1.0, -2.0, 0.0]])
    t = torch.tensor([[-1.5, -2.0, 5.0]]) # last column is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = sampler_mismatch(s, t, mask)
    assert math.isclose(m["mismatch_mean"].item(), 0.25) and math.isclose(m["mismatch_max"].item(), 0.5)
    assert math.isclose(m["mismatch_k3"].item(), (math.exp(-0.5) + 0.5 - 1) / 2, rel_tol=1e-6)
    assert all(v.item() == 0 for v in sampler_mismatch(s, s.clone(), mask).values())


def test_tis_weight_hand_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0, -1.0]], requires_grad=True)
    old_logp = logp.detach() # on-policy: ratio 1
    mask, adv = torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([1.0])
    # sampler == trainer: weight exactly 1, same loss and gradient as without TIS
    base, _ = grpo_loss(logp, old_logp, adv, mask)
    same, m = grpo_loss(logp, old_logp, adv, mask, sampler_logp=old_logp.clone(), tis_cap=3.0)
    assert torch.equal(base, same) and m["tis_mean"].item() == 1.0 and m["tis_capped"].item() == 0.0
    assert torch.equal(grads(base, [logp])[0], grads(same, [logp])[0])
    # sampler gave half / twice / a tenth of the trainer's probability: weights 2, 0.5, min(10, 3) = 3
    sampler = old_logp + torch.tensor([[-math.log(2), math.log(2), -math.log(10), 7.0]])
    loss, m = grpo_loss(logp, old_logp, adv, mask, sampler_logp=sampler, tis_cap=3.0)
    (gr,) = grads(loss, [logp])
    assert torch.allclose(gr, torch.tensor([[-2 / 3, -0.5 / 3, -3 / 3, 0.0]])) # -A * w / |o|
    assert math.isclose(m["tis_mean"].item(), 5.5 / 3, rel_tol=1e-6)
    assert math.isclose(m["tis_capped"].item(), 1 / 3, rel_tol=1e-6)


def test_tis_corrects_a_perturbed_sampler():
    """Tokens drawn from a sampler q != pi: with TIS weights the batch gradient is the exact on-policy expected
    gradient sum_x pi(x) A(x) grad log pi(x); without them it is q's. Rows replicate q = (1/2, 1/4, 1/4) exactly."""
    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    A = torch.tensor([1.0, -1.0, 0.5]) # a fixed advantage per token value
    q = torch.tensor([0.5, 0.25, 0.25])
    rows = torch.tensor([0, 0, 1, 2]) # (B,), one sampled token per row, frequencies = q
    logp = lambda: logits.log_softmax(-1)[rows][:, None] # (B, 1), a fresh graph per loss
    old = logp().detach()
    sampler = q.log()[rows][:, None]
    mask = torch.ones(4, 1)
    pi = logits.detach().softmax(-1)
    assert (pi / q).max() < 3.0 # no capping in this case
    expected = grads(-(pi * A * logits.log_softmax(-1)).sum(), [logits])[0] # on-policy, by enumeration
    with_tis, _ = grpo_loss(logp(), old, A[rows], mask, sampler_logp=sampler, tis_cap=3.0)
    without, _ = grpo_loss(logp(), old, A[rows], mask)
    g_tis = grads(with_tis, [logits])[0]
    g_raw = grads(without, [logits])[0]
    assert torch.allclose(g_tis, expected, atol=1e-6)
    assert not torch.allclose(g_raw, expected, atol=1e-3)
