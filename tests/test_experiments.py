"""experiments.py and covariance.py: the paper's ratio rules on hand-computed and on the paper's own numbers, log
parsing across a resume, the covariance math on vectors with a known covariance, and both scripts end to end on a
tiny model (--quick; experiments.py resumes and skips finished runs).
Run: python -m pytest -q tests/test_experiments.py"""
import json
import os
import subprocess
import sys

import pytest
import torch

import covariance as cv
import experiments as ex
from conftest import make_tiny
from model import from_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def res(m, seed, rollouts, wall, mean, pas, greedy=0.5):
    return {"method": m, "seed": seed, "rollouts": rollouts, "wall_s": wall, "roll_s": wall / 2, "train_s": wall / 2,
            "mean@k": mean, "pass@k": pas, "greedy": greedy, "k": 8,
            "curve": [dict(step=0, acc=0.3, rollouts=0, wall_min=0.0), dict(step=2, acc=greedy, rollouts=rollouts,
                                                                             wall_min=wall / 60)]}

# -----------------------------------------------------------------------------
# ratios and aggregation


def test_ratios_hand_values():
    rs = [res("grpo16", 0, 4096, 100, 0.5, 0.8), res("grpo16", 1, 4096, 200, 0.4, 0.8),
          res("grpo2", 0, 512, 20, 0.45, 0.8), res("grpo2", 1, 512, 50, 0.4, 0.72),
          res("grpo2", 2, 512, 1, 0.0, 0.0)]  # seed 2 has no 16-GRPO partner: left out of every ratio
    r = ex.ratios(rs, "grpo2")
    assert r["rollouts"] == pytest.approx(0.125)
    assert r["time"] == pytest.approx((20 / 100 + 50 / 200) / 2)                      # mean of per-seed ratios
    assert r["retention"] == pytest.approx((0.45 / 0.5 + 0.8 / 0.8 + 0.4 / 0.4 + 0.72 / 0.8) / 4)  # per cell
    assert r["retention_mean"] == pytest.approx((0.45 + 0.4) / (0.5 + 0.4))           # pooled mean@k
    # 16-GRPO's curves go 0.3 -> 0.5 over 100 s (seed 0) and 0.3 -> 0.5 over 200 s (seed 1): at 20 s and 50 s
    assert r["base_at_time"] == pytest.approx((0.3 + 0.2 * 20 / 100 + 0.3 + 0.2 * 50 / 200) / 2)
    assert r["base_at_rollouts"] == pytest.approx(0.3 + 0.2 * 512 / 4096)  # both seeds: 512 of 4096 rollouts
    assert ex.ratios(rs, "grpo16") == pytest.approx(dict(rollouts=1.0, time=1.0, retention=1.0, retention_mean=1.0,
                                                         base_at_time=0.5, base_at_rollouts=0.5))
    none = dict(rollouts=None, time=None, retention=None, retention_mean=None, base_at_time=None, base_at_rollouts=None)
    assert ex.ratios(rs, "dpo") == none
    zero = [res("grpo16", 0, 4096, 0.0, 0.0, 0.0), res("grpo2", 0, 512, 0.0, 0.1, 0.1)]  # tiny runs: 0.0 s, 0 acc
    assert ex.ratios(zero, "grpo2") == {**none, "rollouts": 0.125, "base_at_time": 0.5, "base_at_rollouts": 0.325}


def test_acc_at_interpolates_the_eval_curve():
    curve = [dict(wall_min=0.0, acc=0.2), dict(wall_min=2.0, acc=0.6), dict(wall_min=4.0, acc=0.4)]
    assert [ex.acc_at(curve, x) for x in (0.0, 1.0, 2.0, 3.0, 4.0, 9.0)] == pytest.approx([0.2, 0.4, 0.6, 0.5, 0.4, 0.4])
    assert ex.acc_at([dict(wall_min=0.0, acc=0.3), dict(wall_min=0.0, acc=0.7)], 0.0) == 0.7  # 0-second steps


def test_ratio_rules_reproduce_the_papers_headlines():
    """paper.md section 14: 21.0% = mean of the 5 v2 per-setting time ratios; 97.6% = v3's pooled Avg Mean@32."""
    times = [(2.05, 8.53), (2.43, 9.30), (7.07, 38.40), (2.12, 13.30), (3.63, 17.68)]
    rs = [res(m, s, 0, t[i], 0.5, 0.5) for s, t in enumerate(times) for i, m in enumerate(("grpo2", "grpo16"))]
    assert 100 * ex.ratios(rs, "grpo2")["time"] == pytest.approx(21.01, abs=0.005)
    avg = [(33.37, 34.31), (40.43, 39.94), (33.89, 35.87), (41.73, 42.92)]
    rs = [res(m, s, 1, 1, a[i], 1.0) for s, a in enumerate(avg) for i, m in enumerate(("grpo2", "grpo16"))]
    assert 100 * ex.ratios(rs, "grpo2")["retention_mean"] == pytest.approx(97.63, abs=0.005)


def test_mean_std_and_table():
    assert ex.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))  # sample std
    assert ex.mean_std([4.0]) == (4.0, 0.0)
    rs = [res("grpo16", 0, 4096, 600, 0.5, 0.8), res("grpo16", 1, 4096, 600, 0.3, 0.6),
          res("grpo2", 0, 512, 120, 0.5, 0.4), res("grpo2", 1, 512, 120, 0.3, 0.3)]
    t = ex.table(rs)
    header, rows = t.splitlines()[0], t.splitlines()[2:]
    for col in ("greedy acc", "mean@8", "pass@8", "rollouts", "rollout min", "update min", "total min",
                "time vs grpo16", "retention (v2 rule)", "mean@8 retention (v3 rule)", "paper", "at equal time"):
        assert col in header
    assert [r.split("|")[1].strip() for r in rows] == ["grpo16", "grpo2"]
    g2 = [c.strip() for c in rows[1].split("|")]
    assert g2[4:6] == ["0.400 ± 0.141", "0.350 ± 0.071"]  # mean@k (0.5, 0.3), pass@k (0.4, 0.3)
    assert g2[10:18] == ["12.5%", "20.0%", "75.0%", "100.0%", "75.0% - 75.0% (seeds)", ex.PAPER["grpo2"], "0.340",
                         "0.325"]  # (1+.5+1+.5)/4; .8/.8
    assert [c.strip() for c in rows[0].split("|")][16] == "0.500"  # 16-GRPO against itself: its own final greedy
    assert [x for point in ex.mean_curves(rs, "grpo2") for x in point] == pytest.approx(
        [0.0, 0.0, 0.3, 0.0, 2.0, 512.0, 0.5, 0.0])  # (wall_min, rollouts, acc, acc's std over seeds)


def test_retention_ci_seeds_and_problems():
    """Identical arms: every bootstrap draw is 100%. One seed pair, or a run without per-problem outcomes: seeds only
    (None below 2 pairs). Per problem: 2-GRPO solves problem 0 only, 16-GRPO both, so a draw is 0% (problem 1 twice) .. 100%."""
    rs = [res(m, s, 1, 1, 0.5, 0.5) for m in ("grpo16", "grpo2") for s in (0, 1)]
    assert ex.retention_ci(rs, "grpo2") == (pytest.approx(1.0), pytest.approx(1.0), "seeds")
    assert ex.retention_ci(rs[:3], "grpo2") is None
    for r in rs:
        r["correct"] = [2, 2] if r["method"] == "grpo16" else [2, 0]
    lo, hi, what = ex.retention_ci(rs, "grpo2")
    assert what == "problems x seeds" and lo == 0.0 and hi == pytest.approx(1.0)
    del rs[0]["correct"]
    assert ex.retention_ci(rs, "grpo2")[2] == "seeds"


def test_by_difficulty_bins_problems_by_initial_pass_rate():
    diff = dict(n=4, correct=[0, 1, 2, 3, 4, 0])  # p = 0, .25, .5, .75, 1, 0
    rs = [dict(res("grpo2", 0, 1, 1, 0, 0), correct=[1, 2, 3, 4, 4, 0]),
          dict(res("grpo2", 1, 1, 1, 0, 0), correct=[0, 2, 3, 4, 4, 0]), res("grpo16", 0, 1, 1, 0, 0)]
    rows = ex.by_difficulty(rs, dict(diff))
    assert [(name, idx) for name, idx, _ in rows] == list(zip(ex.BINS, [[0, 5], [1], [2], [3], [4]]))
    assert set(rows[0][2]) == {"grpo2"}  # grpo16's run stores no per-problem outcomes: left out
    assert rows[0][2]["grpo2"][0] == pytest.approx((1 / 16 + 0) / 2)  # mean over seeds of mean@8 on the bin
    assert rows[4][2]["grpo2"] == pytest.approx((0.5, 0.0))
    assert "| p = 0 | 2 | 0.000 | 0.000 | 0.031 ± 0.044 | n/a |" in ex.difficulty_table(rs, diff)


def test_parse_log_after_a_resume(tmp_path):
    """train.py appends to log.txt; after a resume from step 2 steps 2.. are logged again: the last line wins."""
    step = "step {:04d}/0004 | reward 0.1 | roll {}s | train {}s | tok/s 9 | rollouts {} | 0.1 min\n"
    log = ["config: {}\n", "eval step 0000 | held-out greedy acc 0.2000 | trunc 0\n", step.format(0, 10.0, 5.0, 64),
           step.format(1, 10.0, 5.0, 128), "eval step 0002 | held-out greedy acc 0.3000 | x\n",
           step.format(2, 99.0, 99.0, 192),  # killed after this line, before its checkpoint
           "resumed from ckpt.pt at step 2\n", step.format(2, 12.0, 6.0, 192), step.format(3, 12.0, 6.0, 256),
           "eval step 0004 | held-out greedy acc 0.5000 | x\n", "  sample | answer 1 | rewards [1.0] | 'step 9'\n"]
    (tmp_path / "log.txt").write_text("".join(log))
    steps, curve = ex.parse_log(tmp_path / "log.txt")
    assert steps == {0: (10.0, 5.0, 64), 1: (10.0, 5.0, 128), 2: (12.0, 6.0, 192), 3: (12.0, 6.0, 256)}
    assert [(p["step"], p["acc"], p["rollouts"]) for p in curve] == [(0, 0.2, 0), (2, 0.3, 128), (4, 0.5, 256)]
    assert [p["wall_min"] for p in curve] == pytest.approx([0.0, 30 / 60, 66 / 60])  # steps before the eval


def test_method_args_follow_the_lr_rule():
    """Equal rollouts per mini-batch, lr linear in prompts per mini-batch: 16-GRPO 4x16 at lr2/8, 2-GRPO 32x2."""
    c = ex.Config()
    a = {m: dict(x[2:].split("=") for x in ex.method_args(m, c)) for m in ex.METHODS}
    for m, (ppu, lr) in dict(grpo16=(4, 1.25e-6), grpo8=(8, 2.5e-6), grpo4=(16, 5e-6), grpo2=(32, 1e-5)).items():
        assert int(a[m]["prompts_per_update"]) * int(a[m]["k"]) == c.rollouts_per_update
        assert (int(a[m]["prompts_per_update"]), float(a[m]["lr"])) == (ppu, pytest.approx(lr))
    assert a["grpo2_rs"] == {**a["grpo2"], "resample": "True", "rs_max_k": "16"}
    assert a["dpo"] == dict(algo="dpo", k="2", prompts_per_update="32", lr="1e-05", beta="0.1")
    assert all(f"--prompts_per_step={c.prompts_per_step}" in ex.train_args(m, 1, c) for m in ex.METHODS)
    extra = ex.Config(train_extra="--dual_clip=3  --lr=2e-5")  # last, so they override the method's own
    assert ex.train_args("grpo16", 0, extra) == ex.train_args("grpo16", 0, c) + ["--dual_clip=3", "--lr=2e-5"]

# -----------------------------------------------------------------------------
# covariance math


def test_covariance_on_vectors_with_a_known_covariance():
    """g- = c g+ + noise: trace Cov = c Var(g+) for true pairs, ~0 shuffled; Eq. 13 holds at c* = Cov / Var(g-)."""
    g = torch.Generator().manual_seed(0)
    n, D, c = 2000, 16, 0.5
    gp = torch.randn(n, D, generator=g) + 3.0  # the mean is removed by the estimator
    gn = c * gp + torch.randn(n, D, generator=g)
    s = cv.stats(gp, gn, n_perm=50)
    assert s["cov_same"] == pytest.approx(c * D, rel=0.1)          # c * trace(I_D)
    assert abs(s["cov_perm_mean"]) < 0.1 and s["cov_perm_std"] < 1.0 and s["z"] > 10
    assert s["rho_same"] == pytest.approx(c / (1 + c ** 2) ** 0.5, rel=0.1)
    c_star = s["cov_same"] / s["var_neg"]
    assert cv.trace_var(gp - c_star * gn) / s["var_pos"] == pytest.approx(s["var_left_at_best_c"], rel=1e-4)
    assert cv.pair_cov(gp, -gn) == pytest.approx(-s["cov_same"])


def test_count_sketch_is_unbiased_for_inner_products():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5000, generator=g), torch.randn(5000, generator=g)
    b = b + 0.3 * a
    exact, est = (a @ b).item(), []
    for seed in range(200):
        idx, sign = cv.count_sketch(5000, 64, seed)
        sk = lambda v: torch.zeros(64).index_add_(0, idx, sign * v)
        est.append((sk(a) @ sk(b)).item())
    assert sum(est) / len(est) == pytest.approx(exact, rel=0.1)

# -----------------------------------------------------------------------------
# the scripts on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    model = make_tiny(d / "model", "llama", favour=("1", "2", "Ġ", "<|im_end|>"))
    data = d / "ones.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "1"}) + "\n" for i in range(40)))
    return dict(model=model, data=str(data), dir=d)


def script(name, tiny, *args):
    base = [f"--model={tiny['model']}", f"--data={tiny['data']}", "--fallbacks=last_number", "--max_new_tokens=8"]
    return subprocess.run([sys.executable, name, *base, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_experiments_quick_end_to_end_and_resume(tiny):
    out, runs = tiny["dir"] / "results", tiny["dir"] / "runs"
    args = ["--quick", "--methods=grpo16,grpo2", "--eval_n=4", "--threads=1", f"--out={out}", f"--runs={runs}"]
    p = script("experiments.py", tiny, *args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "2 of 2 runs to do, estimated" in p.stdout and "grpo16    G=16 prompts/update   1" in p.stdout
    r16, r2 = (json.load(open(out / f"{m}_s0.json")) for m in ("grpo16", "grpo2"))
    for r in (r16, r2):
        assert set(r) >= {"greedy", "mean@k", "pass@k", "k", "rollouts", "roll_s", "train_s", "wall_s", "curve"}
        assert [pt["step"] for pt in r["curve"]] == [0, 1, 2] and r["k"] == 2
        assert r["wall_s"] == pytest.approx(r["roll_s"] + r["train_s"])
    assert (r16["rollouts"], r2["rollouts"]) == (2 * 8 * 16, 2 * 8 * 2)
    summary = (runs / "grpo2_s0" / "stdout.txt").read_text().split("held-out greedy accuracy: ")[1].splitlines()[0]
    assert "% -> " in summary and " points) in " in summary  # a step-0 eval: before -> after
    md = (out / "RESULTS.md").read_text()
    assert "| grpo2 | 1 |" in md and "| 12.5% |" in md and "retention (v2 rule)" in md and "mean@2 retention" in md
    try:
        import matplotlib  # noqa: F401
        assert (out / "acc_vs_time.png").stat().st_size > 0 and (out / "acc_vs_rollouts.png").stat().st_size > 0
    except ImportError:
        assert "pip install matplotlib" in p.stdout

    # interrupted after training, before its results: the rerun skips grpo16, resumes grpo2 at its last step
    os.remove(out / "grpo2_s0.json")
    p = script("experiments.py", tiny, *args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "skip grpo16 seed 0" in p.stdout and "done grpo2 seed 0" in p.stdout and "1 of 2 runs to do" in p.stdout
    assert "resumed from" in (runs / "grpo2_s0" / "log.txt").read_text()
    assert json.load(open(out / "grpo2_s0.json"))["curve"] == r2["curve"]
    # a run directory made with other settings is never resumed
    os.remove(out / "grpo2_s0.json")
    p = script("experiments.py", tiny, *args, "--num_steps=3")
    assert p.returncode != 0 and "other settings" in p.stderr
    # a grid that changes one arm reports against another grid's 16-GRPO runs (--base_from)
    one = tiny["dir"] / "one"
    one.mkdir()
    (one / "grpo2_s0.json").write_text(json.dumps(r2))
    p = script("experiments.py", tiny, *args[:-2], "--methods=grpo2", f"--out={one}", "--report_only", f"--base_from={out}")
    md = (one / "RESULTS.md").read_text()
    assert p.returncode == 0 and "| grpo2 | 1 |" in md and "| 12.5% |" in md and "Warning" not in md
    assert f"The grpo16 rows are 1 runs of {os.path.relpath(out, ROOT)}, made with their own settings: --model=" in md
    # a rebuild keeps the hand-written "Produced by" header under the title (results/*/RESULTS.md have one)
    header = "**Produced by** (from the repository root):\n\n```\npython experiments.py --methods=grpo2\n```\n\n"
    (one / "RESULTS.md").write_text(md.replace("\n\n", "\n\n" + header, 1))
    p = script("experiments.py", tiny, *args[:-2], "--methods=grpo2", f"--out={one}", "--report_only", f"--base_from={out}")
    assert p.returncode == 0 and (one / "RESULTS.md").read_text() == md.replace("\n\n", "\n\n" + header, 1)
    p = script("experiments.py", tiny, *args[:-2], "--methods=grpo2", f"--out={one}", "--report_only", f"--base_from={one}")
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [f"error: --base_from={one}: no grpo16_s<seed>.json there"]


@pytest.mark.parametrize("whole", [False, True])
def test_covariance_quick(tiny, whole):
    out = tiny["dir"] / "cov.json"
    p = script("covariance.py", tiny, "--quick", f"--out={out}", *(["--layers=0", "--embed=True"] if whole else []))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "Cov(g+, g-) same prompt" in p.stdout
    r = json.load(open(out))
    model, _ = from_pretrained(tiny["model"])  # the whole model: every parameter once (the tied lm_head too)
    assert (r["n_params"] == model.num_params()) == whole
    assert r["n_prompts"] == 4 and r["n_pairs"] >= 4 and r["var_pos"] > 0 and r["var_neg"] > 0
    assert -1 <= r["rho_same"] <= 1 and r["paper"] == dict(cov_same=0.08705, cov_perm=0.00128)
