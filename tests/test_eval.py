"""eval.py: the unbiased pass@k estimator against brute force, the metrics on scripted completions, a real run on
a tiny random model, checkpoint loading, and the script's exit codes. Run: python -m pytest -q tests/test_eval.py"""
import io
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eval as ev
from data import load_problems
from model import from_pretrained
from rollout import Rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))


def run_script(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)

# -----------------------------------------------------------------------------
# pass@k


def test_pass_at_k_hand_values():
    assert ev.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert ev.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)       # 1 - C(3,2)/C(5,2)
    assert ev.pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)    # 1 - C(7,4)/C(10,4)
    assert ev.pass_at_k(32, 1, 1) == pytest.approx(1 / 32)
    assert ev.pass_at_k(1000, 1, 1) == pytest.approx(1e-3)          # product form: no overflow for big n


@pytest.mark.parametrize("n,c", [(5, 2), (6, 1), (6, 3), (4, 0), (4, 4)])
def test_pass_at_k_equals_brute_force(n, c):
    """Fraction of all k-subsets of the n samples that contain at least one correct sample."""
    samples = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(samples, k))
        assert ev.pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
        assert ev.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_edges():
    assert ev.pass_at_k(8, 0, 3) == 0.0
    assert ev.pass_at_k(8, 8, 3) == 1.0
    assert ev.pass_at_k(5, 3, 3) == 1.0  # n - c < k
    for c in range(9):  # k = n: any sample correct
        assert ev.pass_at_k(8, c, 8) == float(c > 0)
    with pytest.raises(ValueError):
        ev.pass_at_k(4, 1, 5)


def test_majority_vote_ties_go_to_first_seen():
    assert ev.majority_vote(["4", "6"], [0.0, 1.0]) == 0.0
    assert ev.majority_vote(["6", "4"], [1.0, 0.0]) == 1.0
    assert ev.majority_vote([None, None], [0.0, 0.0]) == 0.0


def test_majority_vote_by_equivalence():
    # three ways to write one half are one cluster of 3 votes; a string vote would give 1-1-1-1 and "3" would win
    assert ev.majority_vote(["3", "0.5", "1/2", "\\frac{1}{2}"], [0.0, 1.0, 1.0, 1.0]) == 1.0
    assert ev.majority_vote(["3", "3.0", "0.5", "1/2", "\\dfrac12"], [1.0, 1.0, 0.0, 0.0, 0.0]) == 0.0
    assert ev.majority_vote(["x+1", "1+x", "2"], [0.0, 0.0, 1.0]) == 0.0  # symbolic equivalence (math_verify)
    assert ev.majority_vote([None, "2", None, "1/2", "0.5"], [0.0, 1.0, 0.0, 0.0, 0.0]) == 0.0

# -----------------------------------------------------------------------------
# evaluate() on scripted completions


def fake_generate(tok, script, calls):
    """A stand-in for rollout.generate that returns script[problem][sample] = (text, finish) for each row."""
    queue = [x for per_problem in script for x in per_problem]

    def gen(model, prompts, k, max_new_tokens, temperature, top_p, top_k, stop_ids, pad_id, seed):
        calls.append(dict(P=len(prompts), k=k, seed=list(seed)))
        rows = [queue.pop(0) for _ in range(len(prompts) * k)]
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text, _ in rows]
        Tn = max(len(i) for i in ids)
        tokens = torch.full((len(ids), Tn), pad_id)
        mask = torch.zeros(len(ids), Tn)
        for r, i in enumerate(ids):
            tokens[r, :len(i)], mask[r, :len(i)] = torch.tensor(i), 1.0
        return Rollout(None, None, tokens, mask, torch.zeros(len(ids), Tn), [f for _, f in rows])
    return gen


PROBLEMS = [{"prompt": "p0", "answer": "5"}, {"prompt": "p1", "answer": "7"}, {"prompt": "p2", "answer": "9"}]
SCRIPT = [  # n = 4 samples per problem
    [("so \\boxed{5}", "eos"), ("\\boxed{5}", "eos"), ("\\boxed{3}", "eos"), ("\\boxed{5} cut", "length")],  # c=2, maj ok
    [("\\boxed{8}", "eos"), ("it is \\boxed{8}", "eos"), ("\\boxed{7}", "eos"), ("no idea", "eos")],  # c=1, maj wrong
    [("\\boxed{1}", "eos"), ("\\boxed{2}", "eos"), ("\\boxed{9}", "length"), ("\\boxed{2}", "eos")],  # truncated 9: c=0
]


@pytest.mark.parametrize("batch_size", [4, 64])
def test_evaluate_metrics_on_scripted_completions(tiny, monkeypatch, batch_size):
    model, tok = tiny
    calls = []
    monkeypatch.setattr(ev, "generate", fake_generate(tok, SCRIPT, calls))
    m = ev.evaluate(model, tok, PROBLEMS, n=4, temperature=0.7, batch_size=batch_size, seed=3)
    assert m["acc"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert m["pass@1"] == pytest.approx(m["acc"])
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 3)  # 1 - C(n-c,2)/C(4,2) per problem
    assert m["pass@4"] == pytest.approx(2 / 3)  # problem 1: majority wrong but one sample right
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["trunc"] == pytest.approx(2 / 12)
    assert m["len"] == pytest.approx(sum(len(t) for p in SCRIPT for t, _ in p) / 12)  # byte tokenizer: 1 token/char
    assert (m["n_problems"], m["n_samples"]) == (3, 12)
    assert set(m) == {"acc", "pass@1", "pass@2", "pass@4", "maj@4", "trunc", "len", "n_problems", "n_samples"}
    json.dumps(m)
    # about batch_size rows per call, and row seeds that do not depend on the batching
    assert [c["P"] for c in calls] == ([1, 1, 1] if batch_size == 4 else [3])
    assert all(c["k"] == 4 for c in calls)
    seeds = [s for c in calls for s in c["seed"]]
    assert seeds == [hash((3, i, j)) & 0x7FFFFFFF for i in range(3) for j in range(4)]


def test_evaluate_votes_by_equivalence_and_splits_by_source(tiny, monkeypatch):
    model, tok = tiny
    script = [[("\\boxed{3}", "eos"), ("\\boxed{0.5}", "eos"), ("\\boxed{\\frac12}", "eos"), ("\\boxed{1/2}", "eos")],
              [("\\boxed{7}", "eos"), ("\\boxed{7}", "eos"), ("\\boxed{1}", "eos"), ("\\boxed{7}", "length")]]
    problems = [{"prompt": "p0", "answer": "1/2", "source": "a"}, {"prompt": "p1", "answer": "7", "source": "b"}]
    monkeypatch.setattr(ev, "generate", fake_generate(tok, script, []))
    m = ev.evaluate(model, tok, problems, n=4, by_source=True)
    assert m["maj@4"] == 1.0 and m["acc"] == pytest.approx(5 / 8)
    assert list(m["by_source"]) == ["a", "b"]
    assert m["by_source"]["a"]["acc"] == 0.75 and m["by_source"]["b"]["acc"] == 0.5
    assert m["by_source"]["b"]["trunc"] == 0.25 and m["by_source"]["a"]["n_problems"] == 1
    assert {k: v for k, v in m.items() if k != "by_source"} == ev.summarize(
        [(3, 1.0, 0, m["by_source"]["a"]["len"] * 4), (2, 1.0, 1, m["by_source"]["b"]["len"] * 4)], 4, [1, 2, 4])


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_on_a_terminal_only(tiny, monkeypatch, capsys, terminal):
    model, tok = tiny
    monkeypatch.setattr(ev, "generate", fake_generate(tok, SCRIPT, []))
    err = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    ev.evaluate(model, tok, PROBLEMS, n=4, batch_size=4, verbose=True)
    out = capsys.readouterr().out
    if terminal:  # tqdm draws "3/3 [... problem/s]" on stderr, no log lines
        assert "3/3" in err.getvalue() and "problem" in err.getvalue() and "eval " not in out
    else:
        assert err.getvalue() == "" and "eval 3/3 problems" in out


def test_evaluate_default_ks_and_ties(tiny, monkeypatch):
    model, tok = tiny
    script = [[("\\boxed{4}", "eos"), ("\\boxed{6}", "eos"), ("x", "eos"), ("y", "eos"), ("z", "eos")]]
    monkeypatch.setattr(ev, "generate", fake_generate(tok, script, []))
    m = ev.evaluate(model, tok, [{"prompt": "q", "answer": "6"}], n=5)
    assert [k for k in m if k.startswith("pass@")] == ["pass@1", "pass@2", "pass@4", "pass@5"]
    assert m["maj@5"] == 0.0 and m["pass@5"] == 1.0 and m["acc"] == pytest.approx(0.2)
    monkeypatch.setattr(ev, "generate", fake_generate(tok, script, []))
    m = ev.evaluate(model, tok, [{"prompt": "q", "answer": "6"}], n=5, ks=[3])
    assert m["pass@3"] == pytest.approx(ev.pass_at_k(5, 1, 3)) and "pass@1" not in m

# -----------------------------------------------------------------------------
# real generation, checkpoints


def test_evaluate_tiny_model_end_to_end(tiny):
    model, tok = tiny
    problems = load_problems("synthetic:1", "test", 3)
    m = ev.evaluate(model, tok, problems, n=2, temperature=1.0, max_new_tokens=8, fallbacks=("boxed", "last_number"))
    assert set(m) == {"acc", "pass@1", "pass@2", "maj@2", "trunc", "len", "n_problems", "n_samples"}
    assert (m["n_problems"], m["n_samples"]) == (3, 6)
    assert all(0.0 <= m[k] <= 1.0 for k in ("acc", "pass@1", "pass@2", "maj@2", "trunc"))
    assert 1 <= m["len"] <= 8
    assert m == ev.evaluate(model, tok, problems, n=2, temperature=1.0, max_new_tokens=8, batch_size=2,
                            fallbacks=("boxed", "last_number"))


def test_load_model_from_checkpoint(tiny_dir, tmp_path):
    base, _ = from_pretrained(tiny_dir("llama"))
    sd = {k: v + 0.01 for k, v in base.state_dict().items()}
    torch.save({"model": sd, "config": {"model": tiny_dir("llama")}, "step": 3}, tmp_path / "ckpt.pt")
    for where in (tmp_path / "ckpt.pt", tmp_path):  # the file, or its directory
        model, tok = ev.load_model(str(where))
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError):
        ev.load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError):
        ev.load_model("no-such-model-name")
    torch.save({"model": {"bogus": torch.zeros(1)}, "config": {"model": tiny_dir("llama")}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        ev.load_model(str(tmp_path / "bad.pt"))
    torch.save({"weights": sd}, tmp_path / "nokeys.pt")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        ev.load_model(str(tmp_path / "nokeys.pt"))

# -----------------------------------------------------------------------------
# the script


def test_parse_args(tmp_path):
    cfg = ev.parse_args(["--top_k=5", "--preset=paper", "--temperature=1", "--data=synthetic:2"])
    assert (cfg.n_samples, cfg.temperature, cfg.top_p, cfg.top_k) == (32, 1.0, 0.8, 5)  # explicit keys beat the preset
    assert isinstance(cfg.temperature, float) and cfg.fallbacks == "boxed,last_number"
    assert ev.parse_args(["--data=x.jsonl"]).fallbacks == "boxed"
    assert ev.parse_args(["--data=synthetic:1,synthetic:3"]).fallbacks == "boxed,last_number"
    assert ev.parse_args(["--data=synthetic:1,gsm8k"]).fallbacks == "boxed"
    (tmp_path / "c.py").write_text("n_samples = 4\npreset = 'paper'\n")
    assert (ev.parse_args([str(tmp_path / "c.py")]).n_samples, ev.parse_args([str(tmp_path / "c.py")]).top_k) == (4, 20)
    for bad, word in [("--temprature=1", "temperature"), ("--n_samples=two", "int"), ("--n_samples=True", "int"),
                      ("--preset=fast", "paper"), ("--fallbacks=boxed,nope", "nope"), ("--top_p=0", "top_p")]:
        with pytest.raises(ValueError, match=word):
            ev.parse_args([bad])
    with pytest.raises(FileNotFoundError):
        ev.parse_args(["no_such_config.py"])


def test_script_end_to_end(tiny_dir, tmp_path):
    out = tmp_path / "e.json"
    r = run_script(f"--model={tiny_dir('llama')}", "--n_problems=4", "--max_new_tokens=8", f"--out={out}")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["metrics"]["n_problems"] == 4 and "pass@1" in res["metrics"] and "maj@1" in res["metrics"]
    assert res["config"]["max_new_tokens"] == 8 and res["config"]["fallbacks"] == "boxed,last_number"
    assert "mean@1" in r.stdout and "synthetic:1" in r.stdout


def test_script_named_sources_table(tiny_dir, tmp_path):
    out = tmp_path / "e.json"
    r = run_script(f"--model={tiny_dir('llama')}", "--data=math500,gsm8k", "--n_problems=2", "--max_new_tokens=4",
                   f"--out={out}")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert list(res["metrics"]["by_source"]) == ["math500", "gsm8k"] and res["metrics"]["n_problems"] == 4
    assert all(m["n_problems"] == 2 for m in res["metrics"]["by_source"].values())
    table = r.stdout[r.stdout.index("\nsource ") + 1:].splitlines()
    assert [line.split()[0] for line in table[:4]] == ["source", "math500", "gsm8k", "all"]


def test_script_errors_are_one_line(tmp_path):
    r = run_script("--temprature=1")
    assert r.returncode == 2 and "temperature" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "ckpt.pt").write_bytes(b"\x00garbage, not a checkpoint" * 10)
    r = run_script(f"--model={tmp_path / 'ckpt.pt'}", f"--out={tmp_path / 'e.json'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "ckpt.pt" in r.stderr
    assert not (tmp_path / "e.json").exists()
    r = run_script("--data=math500", "--split=train", "--model=no-such-model")  # the data is checked first
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "math500 has no 'train' split" in r.stderr
