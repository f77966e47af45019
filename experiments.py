"""
The paper's comparison, scaled down: 16/8/4/2-GRPO, 2-GRPO+RS and online DPO, several seeds each, one train.py
subprocess per run, eval.evaluate on the final policy (per problem), then a table of the paper's headline ratios and two plots.

    python experiments.py                  # default: 6 methods x 3 seeds, SmolLM2-135M, synthetic:1 (~3 h estimated, 2 CPUs)
    python experiments.py --dry_run        # print the grid and the time estimate, run nothing
    python experiments.py --quick          # smoke grid: 1 seed x 2 steps of 8 prompts (~10 min on 2 CPU cores)
    python experiments.py --methods=grpo16,grpo2 --seeds=5 --out=results/grids/g2 --runs=runs/g2
    python experiments.py --train_n=64 --num_steps=40 --prompts_per_step=16 --rollouts_per_update=32  # 10 epochs
    python experiments.py --report_only    # rebuild <out>/RESULTS.md and the plots from the JSONs
    python experiments.py --train_extra="--dual_clip=3" --out=results/ablations/dual_clip  # one hypothesis
    python experiments.py --methods=grpo2 --rollouts_per_update=8 --base_from=results/ablations/control  # one arm
    python experiments.py --difficulty --eval_n=64 --max_new_tokens=48  # -> results/difficulty/level1.json

-> <out>/<method>_s<seed>.json, <out>/RESULTS.md (printed too), <out>/acc_vs_time.png, acc_vs_rollouts.png; the
default out is results/grids/default (results/README.md: the study, and which folder holds what).
It resumes: a run whose results JSON exists is skipped, an interrupted one continues from runs/<method>_s<seed>/ckpt.pt.
16-GRPO is ~40% of the estimate, evals ~25%; time it on an otherwise idle machine, the ratios depend on it.

Protocol (paper.md section 10, scaled down). Every method sees the same num_steps * prompts_per_step prompts in
the same order (train.py orders them by seed; RS draws extra ones to refill), in generation batches of
prompts_per_step. G-GRPO updates on mini-batches of rollouts_per_update rollouts (prompts_per_update * G, equal for
every G, as 32x16 vs 256x2 in the paper), so 16-GRPO makes 8x more updates per batch, off-policy after the first
(ratio and clipping act). lr is linear in prompts per mini-batch: lr(G) = lr2 * 2 / G (paper: 1e-6 at G=16, 8e-6 at
G=2); we apply this main-setting rule to G=4, 8 too, not the v3 ablation's fixed 32 prompts and lr 1e-6.
2-GRPO+RS refills dropped pairs within 16-GRPO's rollout budget (rs_max_k=16). Online DPO is not in the paper: it
uses 2-GRPO's pairs, mini-batch and lr (untuned; Adam makes the step ~lr whatever the loss scale), beta=0.1.
"""
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from config import parse_config
from data import load_problems
from eval import evaluate, load_model

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("grpo16", "grpo8", "grpo4", "grpo2", "grpo2_rs", "dpo")
BASE = "grpo16"
# the paper's numbers for "<method> vs 16-GRPO": rollouts / wall-clock / accuracy retention (paper.md sections 13-14)
PAPER = {"grpo2": "12.5% / 21.0% / 98.1% (v2), 97.6% (v3)",
         "grpo2_rs": "<=100% / ~45.6% / ~101.1% (v3 Table 1, inferred)",
         "grpo4": "25% / - / 98.2% (v3 Table 4, 32 prompts & lr fixed)",
         "grpo8": "50% / - / 99.4% (v3 Table 4, 32 prompts & lr fixed)",
         "grpo16": "100% / 100% / 100%", "dpo": "not run in the paper"}


@dataclass
class Config:
    model: str = "smollm2-135m-instruct"
    data: str = "synthetic:1"
    fallbacks: str = "boxed,last_number"
    train_n: int = 0               # training problems (train.py --train_n): fewer, so the runs make more epochs
    methods: str = ",".join(METHODS)
    seeds: int = 3                 # seeds 0..seeds-1 (train.py --seed: prompt order and sampling)
    num_steps: int = 8             # generation batches per run
    prompts_per_step: int = 32     # generation batch, in prompts, for every method
    rollouts_per_update: int = 64  # optimizer mini-batch in rollouts, for every G
    lr2: float = 1e-5              # 2-GRPO's lr (train.py's default); lr(G) = lr2 * 2 / G
    dpo_lr: float = 1e-5
    beta: float = 0.1
    max_new_tokens: int = 64       # training and eval
    eval_every: int = 2            # held-out greedy accuracy every this many steps: the curves
    save_every: int = 2            # checkpoints, so an interrupted run resumes
    eval_n: int = 0                # held-out problems; 0 = all (~104 for synthetic:1)
    n_samples: int = 8             # final eval: mean@n and pass@n at the paper's sampling settings
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    threads: int = 0               # torch threads for train.py and the final eval; 0 = default
    train_extra: str = ""          # more train.py args for every run, space-separated, last (they win): one hypothesis
                                   # a grid, e.g. "--dual_clip=3" or "--norm_dropped=True --warmup_steps=2"
    base_from: str = ""            # a grid dir whose 16-GRPO runs are this report's base, when a hypothesis changes
                                   # the other arm only, e.g. results/ablations/control (its settings, in the report)
    difficulty: bool = False       # only measure the initial policy's pass rate on each held-out problem (hypothesis 2)
    difficulty_json: str = "results/difficulty/level1.json"  # written by --difficulty; read by the report
    difficulty_samples: int = 16   # samples per problem for that pass rate, at train.py's sampling (T=1)
    out: str = "results/grids/default"
    runs: str = "runs"
    quick: bool = False
    report_only: bool = False
    dry_run: bool = False          # print the grid and the estimate, run nothing


QUICK = dict(seeds=1, num_steps=2, prompts_per_step=8, rollouts_per_update=16, max_new_tokens=32, eval_every=1,
             save_every=1, eval_n=16, n_samples=2, out="results/grids/quick", runs="runs/quick")
# rough costs on 2 CPU cores for SmolLM2-135M at <= 64 tokens, per rollout sampled / trained on (the 2026-11-28
# CPU grid: 0.09-0.16 s sampling, 0.1-0.14 s update, 16-GRPO at the low end; dev machines differ up to 2x)
SEC_ROLLOUT, SEC_UPDATE, SEC_EVAL_ROW, SEC_PROC, P_CORRECT = 0.12, 0.15, 0.15, 15, 0.3


def group_size(m):
    return 2 if m in ("dpo", "grpo2_rs") else int(m[4:])


def method_args(m, c):
    """train.py overrides for one method: equal rollouts per mini-batch, lr linear in prompts per mini-batch."""
    if m == "dpo":
        return ["--algo=dpo", "--k=2", f"--prompts_per_update={c.rollouts_per_update // 2}", f"--lr={c.dpo_lr:g}",
                f"--beta={c.beta:g}"]
    G = group_size(m)
    args = ["--algo=grpo", f"--k={G}", f"--prompts_per_update={c.rollouts_per_update // G}", f"--lr={c.lr2 * 2 / G:g}"]
    return args + (["--resample=True", "--rs_max_k=16"] if m.endswith("_rs") else [])


def train_args(m, seed, c):
    base = [f"--model={c.model}", f"--data={c.data}", f"--fallbacks={c.fallbacks}", f"--seed={seed}",
            f"--num_steps={c.num_steps}", f"--prompts_per_step={c.prompts_per_step}",
            f"--max_new_tokens={c.max_new_tokens}", f"--eval_every={c.eval_every}", f"--save_every={c.save_every}",
            f"--eval_n={c.eval_n}"] + ([f"--threads={c.threads}"] if c.threads else [])
    base += [f"--train_n={c.train_n}"] if c.train_n else []  # (only when set: older runs' args stay the same)
    return base + method_args(m, c) + c.train_extra.split()


def estimate_s(m, c):
    """Rough seconds for one run: rollouts + updates on informative groups + evals + process starts."""
    G = group_size(m)
    kept = 1 - P_CORRECT ** G - (1 - P_CORRECT) ** G  # chance a group is mixed (trained on)
    rollouts = c.prompts_per_step * G * (1 / kept if m == "grpo2_rs" else 1)  # RS refills until the batch is full
    trained = c.prompts_per_step * G * (1 if m == "grpo2_rs" else kept)
    n_eval = c.eval_n or 104
    evals = (c.num_steps // max(c.eval_every, 1) + 1) * n_eval + 2 * n_eval * c.n_samples  # final: unbatched, ~2x
    return c.num_steps * (rollouts * SEC_ROLLOUT + trained * SEC_UPDATE) + evals * SEC_EVAL_ROW + 2 * SEC_PROC

# -----------------------------------------------------------------------------
# reading a run back: train.py's log.txt (appended to on resume: the last line for a step wins) and eval.py's JSON


STEP_RE = re.compile(r"^step (\d+)/\d+ \|.*\| roll ([\d.]+)s \| train ([\d.]+)s \|.*\| rollouts (\d+) \|")
EVAL_RE = re.compile(r"^eval step (\d+) \| held-out greedy acc ([\d.]+)")


def parse_log(path):
    """log.txt -> (steps {step: (roll_s, train_s, rollouts)}, curve [{step, acc, rollouts, wall_min}]).
    An eval at step S scores the policy after steps 0..S-1: its x values are their totals."""
    steps, evals = {}, {}
    for line in open(path):
        if m := STEP_RE.match(line):
            steps[int(m[1])] = (float(m[2]), float(m[3]), int(m[4]))
        elif m := EVAL_RE.match(line):
            evals[int(m[1])] = float(m[2])
    wall_min = lambda S: sum(r + t for s, (r, t, _) in steps.items() if s < S) / 60
    curve = [dict(step=S, acc=acc, rollouts=steps[S - 1][2] if S else 0, wall_min=wall_min(S))
             for S, acc in sorted(evals.items())]
    return steps, curve


def per_problem(model, c, n, temperature, top_p, top_k):
    """Correct samples out of n on each held-out problem (the eval_n-problem subset train.py and eval.py score, in
    its order): eval.evaluate one problem at a time, since it returns averages only (~2x slower than batched)."""
    if c.threads:
        torch.set_num_threads(c.threads)
    model, tok = load_model(model)
    kw = dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=c.max_new_tokens,
              fallbacks=tuple(c.fallbacks.split(",")))
    return [round(evaluate(model, tok, [p], seed=j, **kw)["acc"] * n)  # row seeds (j, 0, sample): distinct per problem
            for j, p in enumerate(load_problems(c.data, "test", c.eval_n or None))]


def difficulty(c):
    """--difficulty: the initial policy's pass rate on each held-out problem, at train.py's sampling (T=1, no top-p
    or top-k): the p of Prop 5.1 (2-GRPO weights a prompt by ~p(1-p), large-G GRPO by ~sqrt(p(1-p)))."""
    t0 = time.time()
    correct = per_problem(c.model, c, c.difficulty_samples, 1.0, 1.0, 0)
    res = dict(model=c.model, data=c.data, eval_n=c.eval_n, max_new_tokens=c.max_new_tokens,
               n=c.difficulty_samples, correct=correct, minutes=round((time.time() - t0) / 60, 1))
    os.makedirs(os.path.dirname(c.difficulty_json), exist_ok=True)
    json.dump(res, open(c.difficulty_json, "w"))
    print(f"wrote {c.difficulty_json}: {len(correct)} problems x {res['n']} samples in {res['minutes']} min, mean pass "
          f"rate {sum(correct) / (len(correct) * res['n']):.3f}, {sum(x == 0 for x in correct)} never solved")


def run_one(m, seed, c):
    """Train (or resume), evaluate, write <out>/<m>_s<seed>.json. Returns True if it had to do anything."""
    res_path, run_dir = os.path.join(c.out, f"{m}_s{seed}.json"), os.path.join(c.runs, f"{m}_s{seed}")
    if os.path.exists(res_path):
        print(f"skip {m} seed {seed}: {res_path} exists")
        return False
    os.makedirs(run_dir, exist_ok=True)
    args = train_args(m, seed, c)
    args_path = os.path.join(run_dir, "args.json")  # never resume a checkpoint made with other settings
    if os.path.exists(args_path) and json.load(open(args_path)) != args:
        sys.exit(f"error: {run_dir} holds a run with other settings; delete it or pass another --runs")
    json.dump(args, open(args_path, "w"))
    t0 = time.time()
    with open(os.path.join(run_dir, "stdout.txt"), "a") as f:  # train.py keeps its own log.txt; this is the rest
        p = subprocess.run([sys.executable, "train.py", *args, f"--out_dir={run_dir}", "--resume"], cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        print(f"FAILED {m} seed {seed} (exit {p.returncode}); see {run_dir}/stdout.txt")
        return True
    try:
        correct = per_problem(os.path.join(run_dir, "ckpt.pt"), c, c.n_samples, c.temperature, c.top_p, c.top_k)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"FAILED {m} seed {seed}: final eval: {e}")
        return True
    steps, curve = parse_log(os.path.join(run_dir, "log.txt"))
    n, P = c.n_samples, len(correct)
    res = dict(method=m, seed=seed, greedy=curve[-1]["acc"], k=n, **{"mean@k": sum(correct) / (n * P),
               "pass@k": sum(x > 0 for x in correct) / P}, rollouts=steps[max(steps)][2],
               roll_s=sum(v[0] for v in steps.values()), train_s=sum(v[1] for v in steps.values()), curve=curve,
               correct=correct, train_args=args)
    res["wall_s"] = res["roll_s"] + res["train_s"]  # rollout + update time; evals and process starts excluded
    res["device"] = (re.findall(r"\) on (\S+), \d+ rank", open(os.path.join(run_dir, "log.txt")).read()) or ["?"])[-1]
    json.dump(res, open(res_path + ".tmp", "w"), indent=1)
    os.replace(res_path + ".tmp", res_path)  # atomic: a half-written JSON never counts as finished
    print(f"done {m} seed {seed} in {(time.time() - t0) / 60:.1f} min | greedy {res['greedy']:.3f} | "
          f"mean@{n} {res['mean@k']:.3f} | pass@{n} {res['pass@k']:.3f} | {res['rollouts']} rollouts | "
          f"{res['wall_s'] / 60:.1f} min train")
    return True

# -----------------------------------------------------------------------------
# aggregation and the paper's ratios (pure functions on result dicts, unit-tested)


def mean_std(xs):
    """Mean and sample std (n-1; 0 for one value)."""
    mu = sum(xs) / len(xs)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def acc_at(curve, x, key="wall_min"):
    """Held-out greedy accuracy on a run's eval curve at x minutes of training (key="wall_min") or x rollouts
    (key="rollouts"): linear between evals, the last eval's value past the end."""
    pts = [(p[key], p["acc"]) for p in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y1 if x1 <= x0 else y0 + (y1 - y0) * (max(x, x0) - x0) / (x1 - x0)
    return pts[-1][1]


def paired(results, m, base=BASE):
    """({seed: m's result}, {seed: base's result}, the seeds both have)."""
    a = {r["seed"]: r for r in results if r["method"] == m}
    b = {r["seed"]: r for r in results if r["method"] == base}
    return a, b, sorted(a.keys() & b.keys())


def ratios(results, m, base=BASE):
    """The paper's headline ratios of method m to base (paper.md section 14), runs paired by seed (a seed is our
    "setting": same prompts). rollouts: total generated rollouts, sum/sum (12.5% = 0.15M/1.2M). time: mean over
    seeds of the per-seed wall-clock ratio (21.0% = mean of 5 per-setting ratios). retention: mean over seeds x
    {mean@k, pass@k} of per-cell accuracy ratios (v2's 98.1%). retention_mean: pooled mean@k, sum/sum (v3's 97.6%).
    base_at_time: not in the paper, the equal-time view: base's greedy accuracy after as much training time as m
    took (its eval curve, same seed), mean over seeds; base_at_rollouts: the same after as many rollouts as m
    generated (equal rollouts, IsoCompute's x axis). None where nothing is paired or a denominator is 0."""
    a, b, seeds = paired(results, m, base)
    avg = lambda xs: sum(xs) / len(xs) if xs else None
    pooled = lambda key: (sum(a[s][key] for s in seeds) / den if (den := sum(b[s][key] for s in seeds)) else None)
    return dict(rollouts=pooled("rollouts") if seeds else None,
                time=avg([a[s]["wall_s"] / b[s]["wall_s"] for s in seeds if b[s]["wall_s"]]),
                retention=avg([a[s][k] / b[s][k] for s in seeds for k in ("mean@k", "pass@k") if b[s][k]]),
                retention_mean=pooled("mean@k") if seeds else None,
                base_at_time=avg([acc_at(b[s]["curve"], a[s]["wall_s"] / 60) for s in seeds]),
                base_at_rollouts=avg([acc_at(b[s]["curve"], a[s]["rollouts"], "rollouts") for s in seeds]))


def cells(r, idx=None):
    """A run's (mean@k, pass@k), from its per-problem outcomes on the problems idx (repeats allowed) if given."""
    if idx is None:
        return r["mean@k"], r["pass@k"]
    cs = [r["correct"][i] for i in idx]
    return sum(cs) / (r["k"] * len(cs)), sum(x > 0 for x in cs) / len(cs)


def retention_ci(results, m, base=BASE, B=2000, seed=0):
    """95% percentile-bootstrap interval of the v2 retention (hypothesis 4): resample the seed pairs and, where
    every paired run stores per-problem outcomes ("correct"), the held-out problems too (one draw shared by both
    arms and all seeds, as they score the same problems). -> (lo, hi, what was resampled), None below 2 seed pairs.
    Seeds only, 3 seeds: the interval is about the range of the per-seed retentions, a floor on the uncertainty."""
    a, b, seeds = paired(results, m, base)
    if len(seeds) < 2:
        return None
    runs = [a[s] for s in seeds] + [b[s] for s in seeds]
    lens = {len(r.get("correct", [])) for r in runs}
    P = lens.pop() if len(lens) == 1 else 0  # 0: some run has no (or other) per-problem outcomes
    rng, stats = random.Random(seed), []
    for _ in range(B):
        idx = rng.choices(range(P), k=P) if P else None
        rs = [x / y for s in rng.choices(seeds, k=len(seeds)) for x, y in zip(cells(a[s], idx), cells(b[s], idx)) if y]
        stats += [sum(rs) / len(rs)] if rs else []
    stats.sort()
    return stats[int(0.025 * len(stats))], stats[int(0.975 * len(stats)) - 1], "problems x seeds" if P else "seeds"


def table(results, base=BASE):
    """Markdown table: per method, mean ± std over seeds, and its ratios to base."""
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"
    pm = lambda xs, f="{:.3f} ± {:.3f}": f.format(*mean_std(xs))
    k = results[0]["k"]
    lines = [f"| method | seeds | greedy acc | mean@{k} | pass@{k} | rollouts | rollout min | update min | total min "
             f"| rollouts vs {base} | time vs {base} | retention (v2 rule) | mean@{k} retention (v3 rule) "
             f"| retention 95% CI (bootstrap over) | paper: rollouts / time / retention | {base} greedy at equal time "
             f"| {base} greedy at equal rollouts |", "|" + "---|" * 17]
    for m in [x for x in METHODS if any(r["method"] == x for r in results)]:
        rs = [r for r in results if r["method"] == m]
        col = lambda key, f=1.0: [r[key] * f for r in rs]
        rt = ratios(results, m, base)
        mean = lambda key, f: f"{mean_std(col(key, f))[0]:.{0 if key == 'rollouts' else 1}f}"
        cells = [m, len(rs), pm(col("greedy")), pm(col("mean@k")), pm(col("pass@k")), mean("rollouts", 1),
                 mean("roll_s", 1 / 60), mean("train_s", 1 / 60),
                 pm(col("wall_s", 1 / 60), "{:.1f} ± {:.1f}")]
        ci = retention_ci(results, m, base) if m != base else None
        cells += [pct(rt[key]) for key in ("rollouts", "time", "retention", "retention_mean")]
        cells += ["n/a" if ci is None else f"{pct(ci[0])} - {pct(ci[1])} ({ci[2]})", PAPER[m]]
        cells += ["n/a" if rt[key] is None else f"{rt[key]:.3f}" for key in ("base_at_time", "base_at_rollouts")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def mean_curves(results, m):
    """(wall_min, rollouts, acc, acc's std) over seeds at each eval step all of m's seeds share."""
    curves = [{p["step"]: p for p in r["curve"]} for r in results if r["method"] == m]
    common = sorted(set.intersection(*(set(c) for c in curves)))
    mean = lambda S, key: mean_std([c[S][key] for c in curves])[0]
    return [(mean(S, "wall_min"), mean(S, "rollouts"), *mean_std([c[S]["acc"] for c in curves])) for S in common]


BINS = ("p = 0", "0 < p <= 1/3", "1/3 < p <= 2/3", "2/3 < p < 1", "p = 1")


def by_difficulty(results, diff):
    """Hypothesis 2: the held-out problems binned by the initial policy's pass rate p (diff from --difficulty), and
    per bin each method's final mean@k, mean and std over seeds. Methods whose runs all store per-problem outcomes
    for these problems. -> [(bin, problem indices, {method: (mean, std)})]"""
    p = [x / diff["n"] for x in diff["correct"]]
    bin_of = lambda q: 0 if q == 0 else 4 if q == 1 else 1 + (q > 1 / 3) + (q > 2 / 3)
    ms = [m for m in METHODS if (rs := [r for r in results if r["method"] == m])
          and all(len(r.get("correct", [])) == len(p) for r in rs)]
    out = []
    for b, name in enumerate(BINS):
        idx = [i for i, q in enumerate(p) if bin_of(q) == b]
        accs = {m: mean_std([cells(r, idx)[0] for r in results if r["method"] == m]) for m in ms} if idx else {}
        out.append((name, idx, accs))
    return out


def difficulty_table(results, diff):
    """Markdown: one row per difficulty bin, each method's mean@k there, 2-GRPO / 16-GRPO, Prop 5.1's weights."""
    rows = by_difficulty(results, diff)
    ms = sorted({m for _, _, accs in rows for m in accs}, key=METHODS.index)
    w = lambda idx, f: sum(f(diff["correct"][i] / diff["n"]) for i in idx) / len(idx)
    lines = [f"| initial pass rate p ({diff['n']} samples, T=1) | problems | mean p(1-p) (2-GRPO weight) | mean "
             "sqrt(p(1-p)) (large-G weight) | " + " | ".join(f"{m} mean@k" for m in ms) + " | grpo2 / grpo16 |",
             "|" + "---|" * (5 + len(ms))]
    for name, idx, accs in rows:
        ratio = (f"{accs['grpo2'][0] / accs['grpo16'][0]:.2f}" if {"grpo2", "grpo16"} <= accs.keys()
                 and accs["grpo16"][0] else "n/a")
        cells_ = ([f"{w(idx, lambda q: q * (1 - q)):.3f}", f"{w(idx, lambda q: math.sqrt(q * (1 - q))):.3f}"]
                  if idx else ["-", "-"]) + [f"{accs[m][0]:.3f} ± {accs[m][1]:.3f}" if m in accs else "-" for m in ms]
        lines.append("| " + " | ".join([name, str(len(idx)), *cells_, ratio]) + " |")
    return "\n".join(lines)


def plot(results, out, diff=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib")
        return
    for i, (name, xlabel) in enumerate([("acc_vs_time", "training wall-clock (min; rollout + update)"),
                                        ("acc_vs_rollouts", "rollouts generated")]):
        plt.figure(figsize=(6, 4))
        for m in [x for x in METHODS if any(r["method"] == x for r in results)]:
            pts = mean_curves(results, m)
            x, y, sd = [p[i] for p in pts], [p[2] for p in pts], [p[3] for p in pts]
            plt.plot(x, y, marker="o", label=m)
            plt.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], alpha=0.15)
        plt.xlabel(xlabel)
        plt.ylabel("held-out greedy accuracy (mean ± std over seeds)")
        plt.legend()
        plt.grid(alpha=0.3)
        plt.tight_layout()
        plt.savefig(os.path.join(out, f"{name}.png"), dpi=120)
        plt.close()
    if diff:  # per_difficulty.png: final mean@k per difficulty bin, and the initial policy's own pass rate there
        rows = [row for row in by_difficulty(results, diff) if row[1]]
        plt.figure(figsize=(7, 4))
        for m in sorted({m for _, _, accs in rows for m in accs}, key=METHODS.index):
            plt.errorbar(range(len(rows)), [accs[m][0] for _, _, accs in rows], [accs[m][1] for _, _, accs in rows],
                         marker="o", capsize=3, label=m)
        base = [sum(diff["correct"][i] for i in idx) / (diff["n"] * len(idx)) for _, idx, _ in rows]
        plt.plot(range(len(rows)), base, "k--", label="initial policy (T=1)")
        plt.xticks(range(len(rows)), [f"{name}\n({len(idx)} problems)" for name, idx, _ in rows], fontsize=8)
        plt.xlabel("initial policy's pass rate p on the problem")
        plt.ylabel(f"final mean@{results[0]['k']} (mean ± std over seeds)")
        plt.legend()
        plt.grid(alpha=0.3)
        plt.tight_layout()
        plt.savefig(os.path.join(out, "per_difficulty.png"), dpi=120)
        plt.close()


def report(c):
    names = sorted(os.listdir(c.out)) if os.path.isdir(c.out) else []
    results = [json.load(open(os.path.join(c.out, f))) for f in names if re.fullmatch(r"[a-z0-9_]+_s\d+\.json", f)]
    borrowed = []
    if c.base_from and not any(r["method"] == BASE for r in results):
        borrowed = [json.load(open(os.path.join(c.base_from, f))) for f in sorted(os.listdir(c.base_from))
                    if re.fullmatch(rf"{BASE}_s\d+\.json", f)]
        if not borrowed:
            raise FileNotFoundError(f"--base_from={c.base_from}: no {BASE}_s<seed>.json there")
    results += borrowed
    if not results:
        print(f"no results in {c.out}")
        return
    devices = ", ".join(sorted({r["device"] for r in results}))
    epochs = f" ({c.num_steps * c.prompts_per_step / c.train_n:g} epochs of {c.train_n} problems)" if c.train_n else ""
    md = (f"# 16-GRPO vs 2-GRPO and friends, scaled down\n\n{c.model} on {c.data}: {c.num_steps} steps x "
          f"{c.prompts_per_step} prompts per method{epochs}, {c.rollouts_per_update} rollouts per mini-batch, lr(G) = "
          f"{c.lr2:g} * 2/G, dpo lr {c.dpo_lr:g} beta {c.beta:g}. Final eval on the held-out split: greedy, and "
          f"mean@k / pass@k with k={results[0]['k']} samples at T={c.temperature} top-p {c.top_p} top-k {c.top_k}, "
          f"max {c.max_new_tokens} new tokens. Mean ± sample std over seeds; time is rollout + update wall-clock "
          f"(train.py's roll/train seconds), evals excluded; device: {devices}"
          f" ({os.cpu_count()} CPUs here).\n\n{table(results)}\n\n"
          "Ratios to 16-GRPO pair runs by seed, as paper.md section 14: rollouts = total generated rollouts (sum/sum); "
          "time = mean over seeds of per-seed wall-clock ratios; retention (v2 rule, 98.1%) = mean over seeds x "
          "{mean@k, pass@k} of per-cell accuracy ratios; mean@k retention (v3 rule, 97.6%) = pooled sum/sum. "
          "The retention CI is a 95% percentile bootstrap (2000 draws) over seed pairs, and over the held-out "
          "problems where the runs store per-problem outcomes: a CI that excludes 100% is a significant difference "
          "from 16-GRPO, one that excludes 98% a significant shortfall from the paper. The last two columns are not "
          "the paper's: 16-GRPO's held-out greedy accuracy after the same training time (compute: rollout + update "
          "wall-clock on this machine) or the same number of generated rollouts as the method (its eval curve, same "
          "seed, linear between evals), to set against the method's greedy acc.\n\n"
          "![accuracy vs time](acc_vs_time.png) ![accuracy vs rollouts](acc_vs_rollouts.png)\n")
    if borrowed:
        md += (f"\nThe {BASE} rows are {len(borrowed)} runs of {os.path.relpath(c.base_from, ROOT)}, made with their "
               f"own settings: {' '.join(borrowed[0]['train_args'])}\n")
    diff = json.load(open(c.difficulty_json)) if os.path.exists(c.difficulty_json) else None
    want = dict(model=c.model, data=c.data, eval_n=c.eval_n, max_new_tokens=c.max_new_tokens)
    if diff and {k: diff[k] for k in want} != want:
        md += f"\nNo per-difficulty table: {c.difficulty_json} was made for {({k: diff[k] for k in want})}, not {want}\n"
        diff = None
    elif not diff:
        md += f"\nNo per-difficulty table: no {c.difficulty_json} (python experiments.py --difficulty ...)\n"
    elif not any(len(r.get("correct", [])) == len(diff["correct"]) for r in results):
        md += "\nNo per-difficulty table: these runs store no per-problem outcomes (made before experiments.py did)\n"
        diff = None
    else:
        md += (f"\nFinal mean@k by the initial policy's pass rate p on each problem "
               f"({os.path.relpath(c.difficulty_json, ROOT)}; "
               f"hypothesis 2):\n\n{difficulty_table(results, diff)}\n\n![per difficulty](per_difficulty.png)\n")
    same = lambda a: [x for x in a if not x.startswith("--threads=")]  # threads change speed, not the settings
    stale = [f"{r['method']}_s{r['seed']}" for r in results
             if r not in borrowed and same(r["train_args"]) != same(train_args(r["method"], r["seed"], c))]
    if stale:  # the header above describes this invocation's settings
        md += f"\nWarning: made with other training settings than described above: {', '.join(stale)}\n"
    path = os.path.join(c.out, "RESULTS.md")
    old = open(path).read() if os.path.exists(path) else ""
    i, j = old.find("**Produced by**"), old.find(f"\n{c.model} on ")
    if 0 <= i < j:  # the command and commits written by hand under the title survive a rebuild (--report_only)
        title, body = md.split("\n\n", 1)
        md = f"{title}\n\n{old[i:j + 1]}{body}"
    with open(path, "w") as f:
        f.write(md)
    print("\n" + md)
    plot(results, c.out, diff)


if __name__ == "__main__":
    try:
        quick = parse_config(Config(), sys.argv[1:]).quick  # first pass: explicit flags still win over --quick
        c = parse_config(Config(**(QUICK if quick else {})), sys.argv[1:])
        methods = c.methods.split(",")
        if bad := [m for m in methods if m not in METHODS]:
            raise ValueError(f"unknown methods {bad}: choose from {','.join(METHODS)}")
        if any(c.rollouts_per_update % group_size(m) or c.prompts_per_step % (c.rollouts_per_update // group_size(m))
               for m in methods):
            raise ValueError("rollouts_per_update must be a multiple of every G, and prompts_per_step a multiple of "
                             "every prompts_per_update = rollouts_per_update / G")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    c.out, c.runs, c.difficulty_json = map(os.path.abspath, (c.out, c.runs, c.difficulty_json))
    c.base_from = c.base_from and os.path.abspath(c.base_from)
    if c.difficulty:
        try:
            difficulty(c)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            sys.exit(f"error: {e}")
        sys.exit(0)
    grid = [(m, s) for m in methods for s in range(c.seeds)]
    if not c.report_only:
        print(f"grid: {len(methods)} methods x {c.seeds} seeds, {c.num_steps} steps x {c.prompts_per_step} prompts "
              f"each, {c.model} on {c.data} -> {c.out}")
        todo = [(m, s) for m, s in grid if not os.path.exists(os.path.join(c.out, f"{m}_s{s}.json"))]
        for m in methods:
            a = dict(x[2:].split("=") for x in method_args(m, c))
            print(f"  {m:9s} G={a['k']:>2s} prompts/update {a['prompts_per_update']:>3s} lr {a['lr']:>8s} "
                  f"~{estimate_s(m, c) / 60:.0f} min/run")
        est = sum(estimate_s(m, c) for m, _ in todo)
        print(f"{len(todo)} of {len(grid)} runs to do, estimated {est / 3600:.1f} h (SmolLM2-135M on 2 CPU cores)")
        if c.dry_run:
            sys.exit(0)
        os.makedirs(c.out, exist_ok=True)
        done = lambda m, s: os.path.exists(os.path.join(c.out, f"{m}_s{s}.json"))
        failed = [(m, s) for m, s in grid if run_one(m, s, c) and not done(m, s)]
    try:
        report(c)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if not c.report_only and failed:
        sys.exit(f"{len(failed)} runs failed: {failed}")
