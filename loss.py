"""
Losses for GRPO-k, 2-GRPO and DPO. Pure functions, torch only, nothing happens on import.
Equation numbers are from "It Takes Two: Your GRPO Is Secretly DPO" (arXiv 2510.00977 v2).

Conventions (and where they depart from the paper, verl or TRL):
1. Advantage (Eq. 6), group_advantages: A_i = (r_i - mean(r)) / (std(r) + eps) per group of k samples, the
   same for every token.
   Rewards are laid out group-contiguously: prompt0 sample0..k-1, prompt1 sample0..k-1, ...
   - std is the POPULATION std by default (the paper's notation), so a mixed 2-GRPO pair gets exactly
     +1/-1 as in Eq. 14 (with eps=0; eps=1e-6 shrinks it by 2e-6), and binary rewards at any k give
     Eq. 21: A+ = sqrt((1-p)/p), A- = -sqrt(p/(1-p)).
   - verl (`torch.std`) and TRL (`nanstd`) use the Bessel-corrected std: ±1/sqrt(2) = ±0.707 at k=2.
     Reproduce with unbiased=True. scale="none" is Dr. GRPO's r - mean: ±0.5 at k=2.
   - eps = 1e-6 as verl (TRL uses 1e-4). Groups whose rewards are all equal get EXACTLY 0 (forced, not
     eps-noise), so eps=0 is safe. verl gives a singleton group mean 0 / std 1; here k=1 gives 0.
2. Zero-variance groups, informative_groups: they have A=0, hence no gradient when kl_coef=0, so the
   trainer drops them before forward/backward. With kl_coef>0 they would carry KL-only gradient (TRL #5640).
3. Policy loss (Eq. 4-5), grpo_loss, token level: ratio = exp(logp - old_logp), log-ratio clamped to ±20 as verl;
   per-token loss = -min(A*ratio, A*clip(ratio, 1-clip_low, 1+clip_high)).
   - Clip-higher as DAPO and the paper (App. C.1): clip_low=0.2, clip_high=0.28.
   - Dual-clip (dual_clip=c, verl's clip_ratio_c; off by default here, verl's default is c=3): for A<0 the
     per-token loss is also capped at -A*c, so a token whose ratio ran past c stops pushing (clipfrac_dual
     counts them). It can bind on GRPO-16's many updates per batch, rarely on 2-GRPO's 1-2; the paper
     never mentions it.
   - "Clipped" tokens are the ones where the clip bites, i.e. get zero gradient: ratio < 1-clip_low with
     A < 0 (clipfrac_low) and ratio > 1+clip_high with A > 0 (clipfrac_high). Tokens outside the band on
     the other side keep their (unclipped) gradient, as min() picks the unclipped term there.
4. Aggregation (grpo_loss's agg), made invariant to micro-batching by a normaliser computed ONCE on the whole
   mini-batch mask (loss_norm) and passed to every micro-batch call:
   - "seq_mean" (the paper's Eq. 4/18, verl "seq-mean-token-mean", TRL "grpo"): per-sequence token mean,
     then mean over sequences. Per-token weight 1/|o_i| is local to a row; norm = number of sequences.
   - "token_mean" (verl default "token-mean", TRL "dapo"): sum over all tokens / valid tokens in mini-batch.
   - "const" (Dr. GRPO, TRL "dr_grpo"): sum / (number of sequences * max_len).
   The paper does not say which mode its runs used; the default here follows its equations.
   Divisor: by default over the KEPT rows of the mini-batch (zero-variance groups are dropped before the
   forward); the paper's Eq. 18, verl and TRL count every row, dropped ones too (--norm_dropped=True), which
   at a 70% drop rate makes 2-GRPO's gradient ~3x smaller. The default keeps every earlier result here
   comparable; the flag reproduces the others' scale.
5. Sampler/trainer mismatch, sampler_mismatch and grpo_loss's tis_cap: when old_logp is recomputed by the
   trainer (verl's compute_log_prob) the sampler's own log-probs differ by numerics (bf16 sampling, other
   kernels). sampler_mismatch measures it (mean/max |diff|, k3 KL(sampler || trainer) on the sampler's
   tokens). Truncated importance sampling (TIS, tis_cap=C, as verl/TRL's vLLM IS correction) weights each
   token's policy loss by min(pi_old / pi_sampler, C), detached: the tokens were drawn from the sampler, not
   from pi_old. The KL term is not weighted (as TRL).
6. KL to a reference (optional), k3_kl and grpo_loss's kl_coef: k3 estimator exp(ref - logp) - (ref - logp) - 1
   per token, times kl_coef, added to the per-token loss. Default kl_coef=0 (verl use_kl_loss=false, TRL
   beta=0; the paper omits it, footnote 2). verl calls k3 "low_var_kl" and also clamps it to [-10, 10]; we
   only clamp the log-ratio.
7. 2-GRPO as a pairwise objective (Eq. 14), grpo_loss with k=2: with k=2, population std and a mixed pair,
   A = +1 for o+ and -1 for o-, so on-policy (ratio = 1) the gradient of the objective is
   1/2 (grad mean_t log pi(o+) - grad mean_t log pi(o-)): a 1-vs-1 contrastive loss, like DPO's gradient
   (Lemma B.1) but with token-MEAN log-probs and a constant weight instead of sigmoid(r_hat(o-) - r_hat(o+)).
   No new loss term: it is grpo_loss with k=2 (as the paper, which used verl GRPO with rollout.n=2).
8. DPO (Eq. 9), dpo_loss, on SUMMED sequence log-probs (seq_logp), as the DPO reference repo
   (eric-mitchell/direct-preference-optimization, preference_loss): sigmoid loss, label smoothing =
   conservative DPO (cDPO), ipo=True for IPO's (h - 1/(2 beta))^2. Mean over pairs.
"""

import math
import torch
import torch.nn.functional as F

AGGS = ("seq_mean", "token_mean", "const")

# -----------------------------------------------------------------------------
# advantages

def _groups(rewards, k):
    if rewards.dim() != 1 or k < 1 or rewards.numel() % k != 0:
        raise ValueError(f"rewards must be 1-D with length divisible by k; got shape "
                         f"{tuple(rewards.shape)} and k={k} (layout: prompt0 sample0..k-1, prompt1 ...)")
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.view(-1, k) # (N//k, k)

def informative_groups(rewards, k):
    """(N,) rewards -> (N//k,) bool, True where the group's rewards are not all equal."""
    r = _groups(rewards, k) # (N//k, k)
    return r.amax(dim=1) != r.amin(dim=1) # (N//k,)

def group_advantages(rewards, k, scale="std", unbiased=False, eps=1e-6, batch_std=None):
    """(N,) rewards, group-contiguous -> (N,) advantages, Eq. 6 (see module docstring, item 1).
    scale="batch" (TRL scale_rewards="batch", ROLL's LitePPO): group mean, but the std of ALL the batch's rewards,
    so at k=2 mixed pairs no longer all get +-1; batch_std, if given, is that std (e.g. over a batch split in calls)."""
    r = _groups(rewards, k) # (N//k, k)
    adv = r - r.mean(dim=1, keepdim=True) # (N//k, k)
    if scale == "std":
        if k > 1: # k=1: every group is uninformative anyway, and Bessel std would be nan
            adv = adv / (r.std(dim=1, correction=int(unbiased), keepdim=True) + eps) # Eq. 6
    elif scale == "batch":
        std = r.std(correction=int(unbiased)) if batch_std is None else batch_std # nan for 1 reward: zeroed below
        adv = adv / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std', 'batch' or 'none', got {scale!r}")
    # all-equal groups: exactly 0, not rounding noise from the mean divided by eps
    keep = informative_groups(rewards, k).unsqueeze(1) # (N//k, 1)
    adv = torch.where(keep, adv, torch.zeros_like(adv)) # (N//k, k)
    return adv.reshape(-1) # (N,)

# -----------------------------------------------------------------------------
# token log-probs helpers

def token_logp(logits, ids):
    """(B, T, V) logits, (B, T) target ids -> (B, T) log-probs, log-softmax in fp32."""
    return logits.float().log_softmax(dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) # (B, T)

def seq_logp(logp, mask):
    """(B, T) token log-probs -> (B,) summed over completion tokens (DPO's log pi(o|q))."""
    return (logp * mask.to(logp.dtype)).sum(dim=-1) # (B,)

# -----------------------------------------------------------------------------
# GRPO

def loss_norm(mask, agg, max_len=None):
    """The divisor for a whole mini-batch. Compute it ONCE on the full (B, T) mask, then pass it as
    `norm` to grpo_loss on every micro-batch: the sum of the micro-batch losses then equals the
    full-batch loss (and so do the gradients), however the rows are split."""
    if agg == "seq_mean":
        return float(mask.shape[0]) # number of sequences; the 1/|o_i| weight is per row
    if agg == "token_mean":
        return max(float(mask.sum()), 1.0) # valid tokens in the mini-batch
    if agg == "const":
        if max_len is None:
            raise ValueError("agg='const' (Dr. GRPO) needs max_len, e.g. the max new tokens")
        return float(mask.shape[0] * max_len)
    raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")

def k3_kl(logp, ref_logp):
    """Per-token k3 estimate of KL(pi || pi_ref) on samples from pi: exp(d) - d - 1 >= 0, d = ref - logp."""
    d = (ref_logp - logp).clamp(-20.0, 20.0) # (B, T)
    return d.exp() - d - 1.0 # (B, T)

def _masked_mean(x, mask, n):
    return (x * mask).sum() / n

def _masked_max(x, mask):
    return torch.where(mask > 0, x, torch.full_like(x, -math.inf)).max()

def sampler_mismatch(logp_sampler, logp_trainer, mask):
    """(B, T) log-probs of the same tokens from the sampler and from the trainer's forward -> 0-dim tensors
    mismatch_mean / mismatch_max (|difference| over valid tokens) and mismatch_k3 (k3 KL(sampler || trainer) on
    the sampler's tokens). All 0 when the two are the same numbers (fp32 sampling, the sampler as old_logp)."""
    mask = mask.to(logp_sampler.dtype) # (B, T)
    n = mask.sum().clamp(min=1.0)
    d = (logp_sampler - logp_trainer).abs() # (B, T)
    return {"mismatch_mean": _masked_mean(d, mask, n), "mismatch_max": _masked_max(d, mask).clamp(min=0.0),
            "mismatch_k3": _masked_mean(k3_kl(logp_sampler, logp_trainer), mask, n)}

def grpo_loss(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, agg="seq_mean", norm=None,
              max_len=None, ref_logp=None, kl_coef=0.0, dual_clip=0.0, sampler_logp=None, tis_cap=0.0):
    """Clipped-surrogate GRPO loss (to minimise), Eq. 4-5 with clip-higher.
    logp, old_logp, ref_logp, sampler_logp, mask: (B, T), mask 1 on completion tokens; adv: (B,).
    norm: loss_norm() of the whole mini-batch; None computes it from this batch.
    dual_clip: c > 1 caps the loss of A<0 tokens at -A*c (verl's clip_ratio_c); 0 = off (item 3).
    tis_cap: C > 0 weights the policy loss by min(exp(old_logp - sampler_logp), C), detached (TIS, item 5).
    Returns (loss scalar, metrics dict of 0-dim detached tensors; token metrics are local to this batch)."""
    mask = mask.to(logp.dtype) # (B, T)
    A = adv.to(logp.dtype).unsqueeze(1) # (B, 1), one advantage for all tokens of a sequence (Eq. 6)
    logratio = (logp - old_logp).clamp(-20.0, 20.0) # (B, T), clamp as verl: exp() can't overflow
    ratio = logratio.exp() # (B, T), rho_{i,t} in Eq. 5
    surr = A * ratio # (B, T)
    surr_clip = A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high) # (B, T), C_eps with eps_low != eps_high
    per_tok = -torch.min(surr, surr_clip) # (B, T), Eq. 4, negated to a loss
    if dual_clip > 0:
        dual = (A < 0) & (per_tok > -A * dual_clip) # (B, T), verl's pg_clipfrac_lower
        per_tok = torch.where(dual, -A * dual_clip, per_tok) # (B, T), constant there: zero gradient
    if tis_cap > 0:
        tis = (old_logp - sampler_logp).clamp(max=20.0).exp().clamp(max=tis_cap).detach() # (B, T), min(pi_old/pi_s, C)
        per_tok = per_tok * tis
    if ref_logp is not None and kl_coef != 0.0:
        per_tok = per_tok + kl_coef * k3_kl(logp, ref_logp) # (B, T)

    # per-token weights; the global divisor is applied once below
    if agg == "seq_mean":
        w = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0) # (B, T), 1/|o_i| (Eq. 4)
    elif agg in ("token_mean", "const"):
        w = mask # (B, T)
    else:
        raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")
    if norm is None:
        norm = loss_norm(mask, agg, max_len)
    loss = (per_tok * w).sum() / norm

    # diagnostics, over the valid tokens of this batch
    with torch.no_grad():
        n = mask.sum().clamp(min=1.0)
        valid = mask > 0 # (B, T)
        low = (ratio < 1.0 - clip_low) & (A < 0) # (B, T), clip bites on the low side
        high = (ratio > 1.0 + clip_high) & (A > 0) # (B, T), clip bites on the high side
        m = {
            "clipfrac_low": _masked_mean(low.to(mask.dtype), mask, n),
            "clipfrac_high": _masked_mean(high.to(mask.dtype), mask, n),
            # k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old: how far the update moved
            "approx_kl": _masked_mean(logratio.exp() - 1.0 - logratio, mask, n),
            "ratio_mean": _masked_mean(ratio, mask, n),
            "ratio_min": torch.where(valid, ratio, torch.full_like(ratio, math.inf)).min(),
            "ratio_max": _masked_max(ratio, mask),
        }
        if dual_clip > 0:
            m["clipfrac_dual"] = _masked_mean(dual.to(mask.dtype), mask, n)
        if tis_cap > 0:
            m["tis_mean"] = _masked_mean(tis, mask, n)
            m["tis_capped"] = _masked_mean((tis >= tis_cap).to(mask.dtype), mask, n)
        if ref_logp is not None:
            m["kl_ref"] = _masked_mean(k3_kl(logp, ref_logp), mask, n)
    return loss, {key: v.detach() for key, v in m.items()}

# -----------------------------------------------------------------------------
# DPO

def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0, ipo=False):
    """DPO loss (Eq. 9) on (B,) SUMMED sequence log-probs; returns (mean loss over B, metrics)."""
    h = (logp_chosen - logp_rejected) - (ref_chosen - ref_rejected) # (B,), log-ratio margin
    if ipo:
        losses = (h - 1.0 / (2.0 * beta)) ** 2 # (B,), IPO (Azar et al. Eq. 17), as the DPO reference repo
    else:
        # cDPO (label_smoothing = assumed label-flip rate); 0 gives Eq. 9
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h) # (B,)
    # implicit rewards r_hat = beta log(pi / pi_ref) (Lemma B.1)
    chosen = beta * (logp_chosen - ref_chosen).detach() # (B,)
    rejected = beta * (logp_rejected - ref_rejected).detach() # (B,)
    m = {
        "reward_acc": (chosen > rejected).float().mean(),
        "reward_margin": (chosen - rejected).mean(),
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
    }
    return losses.mean(), m
