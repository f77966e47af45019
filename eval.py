"""
Evaluate a model or a training checkpoint on held-out math problems: mean@n ("acc"), unbiased pass@k, maj@n.

    python eval.py --model=out/ckpt.pt                                  # greedy accuracy, synthetic:1 test split
    python eval.py --model=smollm2-135m-instruct --preset=paper         # paper: 32 samples, T=0.7, top-p 0.8, top-k 20
    python eval.py --data=math500,gsm8k --n_problems=0 --max_new_tokens=512   # several sources: one table row each
    python eval.py --model=out --data=math500 --n_problems=0 --preset=paper --max_new_tokens=4096

    from eval import evaluate
    metrics = evaluate(model, tok, problems, n=4, temperature=0.7)     # {"acc": .., "pass@1": .., "maj@4": .., ...}

Vocabulary (arXiv 2510.00977 App. C.1): Mean@32 = acc with n=32, Pass@32 = pass@32 with n=32. pass@k uses the
unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k) averaged over problems; with k = n it is
"any sample correct". Truncated samples (hit max_new_tokens) score 0, as in training, and do not vote in maj@n.
maj@n votes by answer equivalence (reward.is_equiv): 0.5, 1/2 and \frac{1}{2} are one vote.
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from config import atomic_write, check_out_file, load_checkpoint, parse_config
from data import check_prompt_lengths, load_problems
from model import chat_ids, from_pretrained, stop_token_ids
from reward import FALLBACKS, extract_answer, is_equiv, math_reward, normalize_answer
from rollout import generate


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), in product form (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers, scores):
    """Score of the most voted answer (None = no vote), answers grouped by equivalence: each joins the first cluster
    whose first answer it equals (normalised string, then reward.is_equiv), so the cost is one comparison per
    (answer, cluster), not per pair. Ties go to the cluster seen first; the winner scores as its first answer."""
    clusters = {}  # normalised first answer -> [index of the first answer, votes]
    for i, a in enumerate(answers):
        if a is None:
            continue
        key = normalize_answer(a)
        if key not in clusters:  # cheap exact match first; is_equiv only against cluster representatives
            key = next((c for c in clusters if is_equiv(a, answers[clusters[c][0]])), key)
        clusters.setdefault(key, [i, 0])[1] += 1
    if not clusters:
        return 0.0
    first, _ = max(clusters.values(), key=lambda c: c[1])  # max keeps the first of equal counts
    return scores[first]


def summarize(per_problem, n, ks):
    """Metrics from per-problem records (correct samples, maj score, truncated samples, completion tokens)."""
    P, N = max(1, len(per_problem)), max(1, len(per_problem) * n)
    metrics = {"acc": sum(r[0] for r in per_problem) / N}  # mean over problems of c/n (every problem has n samples)
    metrics.update({f"pass@{k}": sum(pass_at_k(n, r[0], k) for r in per_problem) / P for k in ks})
    metrics.update({f"maj@{n}": sum(r[1] for r in per_problem) / P, "trunc": sum(r[2] for r in per_problem) / N,
                    "len": sum(r[3] for r in per_problem) / N, "n_problems": len(per_problem),
                    "n_samples": len(per_problem) * n})
    return metrics


@torch.no_grad()
def evaluate(model, tok, problems, n=1, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=256, batch_size=64,
             fallbacks=("boxed",), seed=0, ks=None, verbose=False, by_source=False, shard=(0, 1)):
    """n samples for each problem ({"prompt", "answer"}) -> flat dict of floats: acc (mean@n), pass@k for k in ks
    (default: powers of 2 up to n, and n), maj@n, trunc (fraction cut at max_new_tokens), len (mean completion
    tokens), n_problems, n_samples. by_source: also "by_source": {problem["source"]: the same dict over its
    problems}. verbose: a progress bar on a terminal, else a line per batch. Row seeds come from (seed, problem
    index, sample index), so results do not depend on batch_size. shard=(rank, world): under torch.distributed each
    rank generates for every world-th problem and all ranks return the metrics of all problems."""
    ks = sorted({2 ** i for i in range(n.bit_length())} | {n}) if ks is None else sorted(set(ks))
    if not all(1 <= k <= n for k in ks):
        raise ValueError(f"every k in ks must be in 1..n={n}, got {ks}")
    stop_ids = stop_token_ids(tok, model.cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    per_call = max(1, batch_size // n)  # prompts per generate call: about batch_size rows
    rank, world = shard
    mine = range(rank, len(problems), world)  # global problem indices: they seed the rows
    per_problem = []  # (correct samples, maj@n score, truncated samples, completion tokens) for each problem
    t0 = time.time()
    bar = tqdm(total=len(mine), unit="problem", dynamic_ncols=True) if verbose and sys.stderr.isatty() else None
    for i in range(0, len(mine), per_call):
        batch = [problems[g] for g in mine[i:i + per_call]]
        prompts = [chat_ids(tok, p["prompt"]) for p in batch]
        seeds = [hash((seed, mine[i + r // n], r % n)) & 0x7FFFFFFF for r in range(len(batch) * n)]
        ro = generate(model, prompts, k=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, stop_ids=stop_ids, pad_id=pad_id, seed=seeds)
        lens = ro.mask.sum(1).long().tolist()  # (B,) completion tokens, stop token included
        texts = tok.batch_decode([row[:L] for row, L in zip(ro.tokens.tolist(), lens)], skip_special_tokens=True)
        for j, prob in enumerate(batch):
            rows = range(j * n, (j + 1) * n)  # row r belongs to prompt r // n
            cut = [ro.finish[r] == "length" for r in rows]
            scores = [math_reward(texts[r], prob["answer"], fallbacks, truncated=t) for r, t in zip(rows, cut)]
            # a truncated sample has no final answer: it casts no vote, like it earns no reward
            answers = [None if t else extract_answer(texts[r], fallbacks) for r, t in zip(rows, cut)]
            per_problem.append((int(sum(scores)), majority_vote(answers, scores), sum(cut), sum(lens[r] for r in rows)))
        if bar is not None:
            bar.update(len(batch))
        elif verbose:
            print(f"eval {min(i + per_call, len(mine))}/{len(mine)} problems | {time.time() - t0:.1f}s")
    if bar is not None:
        bar.close()
    if world > 1:  # back to the order of `problems`: rank r holds problems r, r + world, ...
        parts = [None] * world
        torch.distributed.all_gather_object(parts, per_problem)
        per_problem = [parts[g % world][g // world] for g in range(len(problems))]
    metrics = summarize(per_problem, n, ks)
    if by_source:
        sources = [p.get("source", "") for p in problems]
        metrics["by_source"] = {s: summarize([r for r, ps in zip(per_problem, sources) if ps == s], n, ks)
                                for s in dict.fromkeys(sources)}
    return metrics


def load_model(name_or_path, device="cpu", dtype=torch.float32):
    """(model, tok) from a from_pretrained name/path, or from a training checkpoint: a .pt file (or a directory
    holding ckpt.pt) with {"model": state_dict, "config": {"model": base model name/path, ...}}.
    Raises FileNotFoundError / ValueError with a one-line message."""
    path = str(name_or_path)
    if os.path.isfile(os.path.join(path, "ckpt.pt")):
        path = os.path.join(path, "ckpt.pt")
    if not path.endswith(".pt"):
        return from_pretrained(path, device, dtype)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_checkpoint(path)
    try:
        sd, base = ckpt["model"], ckpt["config"]["model"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable training checkpoint (no {e} entry)") from None
    model, tok = from_pretrained(base, device, dtype)
    try:  # a compiled model's state_dict carries an _orig_mod. prefix
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in sd.items()})
    except RuntimeError as e:
        why = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: weights do not fit the base model {base!r} ({why})") from None
    return model, tok

# -----------------------------------------------------------------------------
# script config


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"  # from_pretrained name/path, or a training checkpoint (.pt / dir with ckpt.pt)
    data: str = "synthetic:1"   # load_problems sources, comma-separated: synthetic[:L], gsm8k, math500, ..., a file, hf:..
    split: str = "test"         # held-out split (synthetic, named and hub data; svamp/asdiv/mawps also "all")
    n_problems: int = 200       # seeded subset of each source's problems; 0 = all
    n_samples: int = 1          # samples per problem: the n in mean@n / pass@k / maj@n
    temperature: float = 0.0    # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0              # 0 = off
    max_new_tokens: int = 256   # longer completions count as truncated and score 0
    batch_size: int = 64        # rows (prompts x samples) per generate call
    fallbacks: str = ""         # answer extractors (reward.FALLBACKS); "" = boxed,last_number if all synthetic, else boxed
    seed: int = 0               # problem subset and sampling seed
    device: str = "auto"        # auto = cuda > mps > cpu
    out: str = "out/eval.json"  # metrics (all problems, and by source) + resolved config
    preset: str = ""            # "paper": the paper's eval sampling (explicit --key=value still wins)


PRESETS = {"": {}, "paper": dict(n_samples=32, temperature=0.7, top_p=0.8, top_k=20)}  # App. C.1 (length 4096 there)


def parse_args(argv):
    """[config files and --key=value ...] -> Config, through config.parse_config (shared with train.py).
    Raises ValueError / FileNotFoundError with a one-line message (unknown keys name the closest valid one)."""
    preset = parse_config(Config(), argv).preset  # a first pass finds the preset, so explicit keys override it
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(p for p in PRESETS if p)}")
    cfg = parse_config(Config(**PRESETS[preset]), argv)
    if cfg.n_samples < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1 or cfg.n_problems < 0:
        raise ValueError("n_samples, batch_size and max_new_tokens must be >= 1, n_problems >= 0")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise ValueError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")
    synthetic = all(s.startswith("synthetic") for s in cfg.data.split(","))
    cfg.fallbacks = cfg.fallbacks or ("boxed,last_number" if synthetic else "boxed")
    if bad := [f for f in cfg.fallbacks.split(",") if f not in FALLBACKS]:
        raise ValueError(f"unknown fallbacks {bad}: choose from {','.join(FALLBACKS)}")
    return cfg

# -----------------------------------------------------------------------------
# script


if __name__ == "__main__":
    def die(msg):  # one line and exit code 2, like a usage error, never a traceback
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    def interrupted(*_):  # Ctrl-C: one line, exit 130 (128 + SIGINT), no stack trace
        print("\ninterrupted: no results written", file=sys.stderr)
        sys.exit(130)

    signal.signal(signal.SIGINT, interrupted)
    try:
        cfg = parse_args(sys.argv[1:])
        check_out_file(cfg.out)  # a bad --out fails now, not after the eval
    except (ValueError, FileNotFoundError) as e:
        die(e)
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else
                                                      "mps" if torch.backends.mps.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    problems = []
    try:  # the problems first: a bad source fails before the model loads
        for source in cfg.data.split(","):
            ps = load_problems(source, cfg.split, cfg.n_problems or None, cfg.seed)
            if not ps:
                die(f"no problems in {source!r} split {cfg.split!r}")
            problems += [dict(p, source=source) for p in ps]  # the table's rows are the --data entries
        model, tok = load_model(cfg.model, device, dtype)
        check_prompt_lengths(problems, tok, model.cfg.max_seq_len - cfg.max_new_tokens, "--data")
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        die(e)

    t0 = time.time()
    metrics = evaluate(model, tok, problems, n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                       top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                       fallbacks=tuple(cfg.fallbacks.split(",")), seed=cfg.seed, verbose=True, by_source=True)
    dt = time.time() - t0

    print(f"\n{cfg.model} | {cfg.split} split | n {cfg.n_samples} T {cfg.temperature} top_p {cfg.top_p} "
          f"top_k {cfg.top_k} | max_new_tokens {cfg.max_new_tokens} | fallbacks {cfg.fallbacks} | {device}")
    rows = dict(metrics["by_source"], **({"all": metrics} if len(metrics["by_source"]) > 1 else {}))
    cols = [k for k in metrics if k not in ("by_source", "n_samples")]
    names = {"acc": f"mean@{cfg.n_samples}", "n_problems": "problems"}
    width = max(len("source"), *map(len, rows))
    print(f"{'source':<{width}} " + " ".join(f"{names.get(k, k):>9}" for k in cols))
    for source, m in rows.items():
        print(f"{source:<{width}} " + " ".join(f"{m[k]:>9.4f}" if isinstance(m[k], float) else f"{m[k]:>9}" for k in cols))
    print(f"time {dt:.1f}s ({metrics['n_samples'] / dt:.1f} samples/s)")
    result = {"metrics": metrics, "config": asdict(cfg), "device": device, "time_s": round(dt, 2)}
    try:  # atomic: a crash or a full disk leaves any previous file whole
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        atomic_write(cfg.out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    except OSError as e:
        die(f"cannot write {cfg.out}: {e.strerror} (the table above holds the results)")
    print(f"wrote {cfg.out}")
