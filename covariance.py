"""
Prop 4.1's premise, measured (paper.md section 6, v3 App. B.8 Table 2: Cov(g+, g-) = 0.087 same-prompt vs 0.0013
shuffled): gradients of a correct and an incorrect response to the SAME prompt are positively correlated, so
g+ - g- has less variance than g+ alone; pairs shuffled across prompts are not.

    python covariance.py            # SmolLM2-135M, synthetic:1, 32 mixed prompts x 8 responses: ~5-10 min, 2 CPUs
    python covariance.py --quick    # smoke: 4 prompts x 4 responses, well under a minute

g = grad of log pi(o|q) (summed over completion tokens at T=1, as Prop 4.1; --agg=mean for the token mean GRPO
uses) with respect to the last `layers` transformer blocks and the final norm by default; --layers=0 --embed=True
takes the whole model, the tied embedding/lm_head included. Each g is count-sketched to `dim` numbers (every
coordinate lands in one seeded bucket with a seeded sign: E<Sa, Sb> = <a, b>, so inner products and hence trace
covariances are unbiased). Cov is the trace covariance over pairs, mean_i <g+_i - mean g+, g-_i - mean g->, over
all (correct, incorrect) pairs of each mixed prompt; the baseline pairs each g+ with a random permutation of the
g- (mostly other prompts; expectation exactly 0). rho = Cov / sqrt(Var+ Var-) is the scale-free version, and
1 - rho^2 is Prop 4.1's variance left at the best c (Eq. 13).
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from config import parse_config
from data import load_problems
from model import chat_ids, from_pretrained, stop_token_ids
from reward import math_reward
from rollout import completion_logprobs, generate


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    data: str = "synthetic:1"
    fallbacks: str = "boxed,last_number"
    n_prompts: int = 32        # mixed prompts to keep (at least one correct and one incorrect response)
    n_responses: int = 8       # samples per prompt at temperature 1
    max_new_tokens: int = 48
    layers: int = 2            # gradient w.r.t. the last `layers` blocks (+ final norm); 0 = every block
    embed: bool = False        # also the embedding (tied to lm_head in SmolLM2: 28M of its 135M parameters)
    dim: int = 4096            # count-sketch size
    agg: str = "sum"           # sum: log pi(o|q) as Prop 4.1 | mean: per-token mean, as GRPO's loss
    n_perm: int = 200          # shuffled baselines
    seed: int = 0
    threads: int = 0
    out: str = "results/covariance/covariance.json"
    quick: bool = False


QUICK = dict(n_prompts=4, n_responses=4, max_new_tokens=24, dim=512, n_perm=50,
             out="results/covariance/covariance_quick.json")


def count_sketch(numel, dim, seed):
    """Bucket and sign of every coordinate: sketch(g) = zeros(dim).index_add_(0, idx, sign * g)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(dim, (numel,), generator=gen), torch.randint(2, (numel,), generator=gen).float() * 2 - 1


def pair_cov(gp, gn):
    """(n, D), (n, D) rows paired -> trace covariance: mean over rows of <gp_i - mean gp, gn_i - mean gn>."""
    return ((gp - gp.mean(0)) * (gn - gn.mean(0))).sum(1).mean().item()


def trace_var(g):
    return pair_cov(g, g)


def perm_covs(gp, gn, n_perm, seed=0):
    """pair_cov with the g- rows randomly permuted, n_perm times: the shuffled-pair baseline."""
    gen = torch.Generator().manual_seed(seed)
    return [pair_cov(gp, gn[torch.randperm(len(gn), generator=gen)]) for _ in range(n_perm)]


def stats(gp, gn, n_perm, seed=0):
    same, perm = pair_cov(gp, gn), torch.tensor(perm_covs(gp, gn, n_perm, seed))
    vp, vn = trace_var(gp), trace_var(gn)
    rho = same / (vp * vn) ** 0.5
    return dict(cov_same=same, cov_perm_mean=perm.mean().item(), cov_perm_std=perm.std().item(),
                cov_perm_first=perm[0].item(), ratio_same_to_perm=same / perm.abs().mean().item(),
                z=same / perm.std().item(), var_pos=vp, var_neg=vn, rho_same=rho,
                rho_perm=perm.mean().item() / (vp * vn) ** 0.5, var_left_at_best_c=1 - rho ** 2, n_pairs=len(gp))


if __name__ == "__main__":
    try:
        quick = parse_config(Config(), sys.argv[1:]).quick
        cfg = parse_config(Config(**(QUICK if quick else {})), sys.argv[1:])
        model, tok = from_pretrained(cfg.model)
        pool = load_problems(cfg.data, "train", n=20 * cfg.n_prompts, seed=cfg.seed)  # 20x: initial accuracy is low
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    stops = stop_token_ids(tok, model.cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    fallbacks = tuple(cfg.fallbacks.split(","))
    enc = lambda p: chat_ids(tok, p["prompt"])

    # ---- sample n_responses per prompt at T=1, keep prompts whose responses are mixed (as 2-GRPO trains on)
    kept, tried, M = [], 0, cfg.n_responses
    for i in range(0, len(pool), 8):
        chunk = pool[i:i + 8]
        ids = [enc(p) for p in chunk]
        ro = generate(model, ids, k=M, max_new_tokens=cfg.max_new_tokens, temperature=1.0, stop_ids=stops, pad_id=pad,
                      seed=[hash((cfg.seed, i + r // M, r % M)) & 0x7FFFFFFF for r in range(len(chunk) * M)])
        lens = ro.mask.sum(1).long().tolist()
        texts = tok.batch_decode([row[:n] for row, n in zip(ro.tokens.tolist(), lens)], skip_special_tokens=True)
        for j, p in enumerate(chunk):
            rows = range(j * M, (j + 1) * M)
            r = [math_reward(texts[x], p["answer"], fallbacks, truncated=ro.finish[x] == "length") for x in rows]
            if 0 < sum(r) < M:
                kept.append((ids[j], [ro.tokens[x, :lens[x]] for x in rows], r))
        tried += len(chunk)
        if len(kept) >= cfg.n_prompts:
            break
    kept = kept[:cfg.n_prompts]
    print(f"{len(kept)} mixed prompts of {tried} tried ({time.time() - t0:.0f}s)")
    if len(kept) < 2:
        sys.exit("error: fewer than 2 prompts with mixed rewards; try more --n_responses or a larger pool")

    # ---- one backward per response; only the chosen parameters need gradients
    model.requires_grad_(False)
    blocks = model.layers[-cfg.layers:] if cfg.layers else model.layers
    params = [p for blk in blocks for p in blk.parameters()] + list(model.norm.parameters())
    if cfg.embed:
        params += [model.embed_tokens.weight] + ([] if model.cfg.tie_embeddings else [model.lm_head.weight])
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    idx, sign = count_sketch(n_params, cfg.dim, cfg.seed)
    gp, gn = [], []
    for n, (prompt, responses, r) in enumerate(kept):
        sk = []
        for toks in responses:
            pid = torch.tensor([prompt])
            logp = completion_logprobs(model, pid, torch.ones_like(pid, dtype=torch.bool), toks[None],
                                       torch.ones(1, len(toks)), temperature=1.0)
            (logp.sum() / (len(toks) if cfg.agg == "mean" else 1)).backward()
            g = torch.cat([p.grad.flatten() for p in params])
            sk.append(torch.zeros(cfg.dim).index_add_(0, idx, sign * g))
            model.zero_grad(set_to_none=True)
        pos, neg = [s for s, x in zip(sk, r) if x > 0], [s for s, x in zip(sk, r) if x == 0]
        gp += [a for a in pos for _ in neg]  # every (correct, incorrect) pair of this prompt
        gn += [b for _ in pos for b in neg]
        print(f"prompt {n + 1}/{len(kept)}: {len(pos)} correct, {len(neg)} incorrect ({time.time() - t0:.0f}s)")

    res = stats(torch.stack(gp), torch.stack(gn), cfg.n_perm, cfg.seed)
    print(f"Cov(g+, g-) same prompt {res['cov_same']:.4g} | shuffled {res['cov_perm_mean']:.3g} ± "
          f"{res['cov_perm_std']:.3g} (over {cfg.n_perm} permutations) | ratio same/|shuffled| "
          f"{res['ratio_same_to_perm']:.1f} | z {res['z']:.1f}")
    print(f"rho same {res['rho_same']:.3f} | shuffled {res['rho_perm']:.4f} | Var(g+ - c* g-) / Var(g+) = "
          f"{res['var_left_at_best_c']:.3f} | {res['n_pairs']} pairs | paper (Qwen-1.5B, 100 MATH prompts x 10): "
          f"0.08705 vs 0.00128")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(dict(**res, n_params=n_params, n_prompts=len(kept), n_tried=tried, time_s=round(time.time() - t0, 1),
                       config=asdict(cfg), paper=dict(cov_same=0.08705, cov_perm=0.00128)), f, indent=1)
    print(f"wrote {cfg.out}")
