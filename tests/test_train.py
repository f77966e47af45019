"""train.py end to end on a tiny model, as users run it: every algorithm for 2 steps, resume exactness, DDP (gloo)
against one process, atomic checkpoints, and one clear error line for each kind of bad input.
Run: python -m pytest -q tests/test_train.py"""
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from conftest import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model that often says "1", "2", spaces or stops, and a task whose answer is 1: rewards come out mixed."""
    d = tmp_path_factory.mktemp("train")
    model = make_tiny(d / "model", "llama", favour=("1", "2", "Ġ", "<|im_end|>"))
    data = d / "ones.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "1"}) + "\n" for i in range(40)))
    prefs = d / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "1", "rejected": "2 2"}) + "\n" for i in range(20)))
    return dict(model=model, data=str(data), prefs=str(prefs), dir=d)


def run(setup, out, *args, torchrun=0, env=None, script=("train.py",)):
    base = [f"--model={setup['model']}", f"--data={setup['data']}", f"--eval_data={setup['data']}", f"--out_dir={out}",
            "--prompts_per_step=8", "--prompts_per_update=4", "--max_new_tokens=12", "--num_steps=2", "--eval_n=4",
            "--eval_every=0", "--fallbacks=last_number", "--lr=1e-3", "--threads=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}", "--master_port=29517"] \
        if torchrun else [sys.executable]
    p = subprocess.run(launcher + list(script) + base + list(args), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return p


def steps(out):
    return [line for line in open(os.path.join(out, "log.txt")) if line.startswith("step ")]


def params(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["model"]


@pytest.mark.parametrize("args", [
    ["--algo=grpo", "--k=2", "--grad_ckpt=True"],
    ["--algo=grpo", "--k=4", "--agg=token_mean", "--adv_unbiased=True", "--train_n=10"],
    ["--algo=grpo", "--k=2", "--kl_coef=0.05", "--agg=const", "--dtype=bfloat16"],  # CPU autocast over fp32 weights
    ["--algo=grpo", "--k=2", "--resample=True"],
    ["--algo=dpo", "--k=2"],
    ["--algo=dpo_offline", "--ipo=True"],
], ids=["2grpo", "4grpo", "kl_bf16", "2grpo_rs", "dpo_online", "dpo_offline"])
def test_each_algorithm_trains(setup, tmp_path, args):
    extra = [f"--data={setup['prefs']}"] if "--algo=dpo_offline" in args else []
    p = run(setup, tmp_path, *args, *extra)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = steps(tmp_path)
    assert len(lines) == 2
    assert any(float(line.split("gnorm ")[1].split()[0]) > 0 for line in lines), lines  # an update really happened
    before = torch.load(os.path.join(tmp_path, "ckpt.pt"), weights_only=False)
    assert before["state"]["step"] == 2 and before["config"]["algo"] in args[0]
    assert "held-out greedy accuracy: " in p.stdout and "no step-0 eval" in p.stdout  # --eval_every=0: end only
    assert f"{10 if '--train_n=10' in args else 20 if 'dpo_offline' in args[0] else 40} training items" in p.stdout
    if "--resample=True" in args and "--kl_coef=0.05" not in args:  # RS refilled dropped pairs
        assert all(" zero_var " in line for line in lines)
        assert int(lines[-1].split("rollouts ")[1].split()[0]) > 2 * 8 * 2


def test_resume_is_exact(setup, tmp_path):
    """4 steps straight == 2 steps, then --resume for 2 more (same parameters)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(setup, a, "--num_steps=4").returncode == 0
    assert run(setup, b, "--num_steps=2").returncode == 0
    p = run(setup, b, "--num_steps=4", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from" in p.stdout
    pa, pb = params(a), params(b)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not torch.equal(pa["lm_head.weight"], torch.load(os.path.join(b, "ckpt.pt"), weights_only=False)["model"]
                           ["lm_head.weight"] * 0)  # sanity: real tensors


def test_ddp_two_processes_equal_one(setup, tmp_path):
    """torchrun with 2 gloo ranks splits the prompts; after the steps the parameters equal a 1-process run."""
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = run(setup, one, "--num_steps=1")
    p2 = run(setup, two, "--num_steps=1", torchrun=2)
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    assert "2 rank(s)" in p2.stdout
    a, b = [torch.load(os.path.join(d, "ckpt.pt"), weights_only=False) for d in (one, two)]
    # the gradients: Adam's first moment after one update is (1 - beta1) * grad, so it shows a wrong normaliser
    # (Adam's first step itself is scale-invariant and would hide one)
    for i, sa in a["optimizer"]["state"].items():
        ga, gb = sa["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert (ga - gb).abs().max() <= 1e-3 * ga.abs().max() + 1e-12
    # parameters: equal up to Adam's sign-like step on float-noise-sized gradients (lr 1e-3)
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) <= 1e-4, max((a[k] - b[k]).abs().max().item() for k in a)
    # same rewards and rollout stats; the metrics after them (kl, entropy, mismatch) are means over micro-batches,
    # which sharding changes at float-noise level
    assert steps(one)[0].split("| clip_low")[0] == steps(two)[0].split("| clip_low")[0]


def mixed_data(tmp_path):
    """A third of the problems have an answer the model never says: their groups are dropped, unevenly over ranks."""
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "7" if i % 3 == 0 else "1"}) + "\n"
                            for i in range(40)))
    return data


@pytest.mark.parametrize("args,fsdp", [
    (["--k=2", "--resample=True", "--num_steps=3"], []),
    (["--k=16", "--prompts_per_step=8", "--prompts_per_update=2", "--num_steps=2"], []),
    (["--k=2", "--resample=True", "--num_steps=3"], ["--fsdp=True"]),
    (["--k=16", "--prompts_per_step=8", "--prompts_per_update=2", "--num_steps=2", "--kl_coef=0.05"], ["--fsdp=True"]),
], ids=["2grpo_rs", "16grpo", "2grpo_rs_fsdp", "16grpo_kl_fsdp"])
def test_ddp_equals_one_process_over_steps(setup, tmp_path, args, fsdp):
    """2 gloo ranks == 1 process over several steps and mini-batches: the global list of kept groups is split into
    mini-batches as one process splits it, then sharded over ranks. With RS, refills of fewer prompts than ranks leave
    a rank nothing to sample (it must not crash). Fails if each rank splits its own groups. FSDP2 (--fsdp=True) gives
    the same parameters too: uneven shards make ranks run different numbers of forwards, which must not hang or
    desynchronise FSDP's collectives (the sampler and scorer run on gathered weights, the update pads the backwards)."""
    data = mixed_data(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    p1, p2 = [run(setup, out, *args, f"--data={data}", *extra, torchrun=n) for out, n, extra in
              ((one, 0, []), (two, 2, fsdp))]
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    a, b = params(one), params(two)
    # Adam moves float-noise-sized gradients by up to ~lr per update: 1e-4 is that noise, a wrong split is ~1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4, max((a[k] - b[k]).abs().max().item() for k in a)
    # same rollouts and rewards (kl / entropy are micro-batch means, which the sharding changes)
    assert [line.split("| clip_low")[0] for line in steps(one)] == [line.split("| clip_low")[0] for line in steps(two)]
    evals = [[line for line in open(os.path.join(out, "log.txt")) if line.startswith("eval ")] for out in (one, two)]
    assert evals[0] and evals[0] == evals[1]  # eval sharded over the 2 ranks == one process
    assert len(torch.load(os.path.join(one, "ckpt.pt"), weights_only=False)["optimizer"]["state"]) > 0  # it trained


# train.py under a recorder of every rollout.completion_logprobs call: rows, padded width, each row's last token
RECORD = ("import json, os, runpy, sys, rollout\n"
          "orig, calls = rollout.completion_logprobs, []\n"
          "def rec(model, prompt_ids, prompt_mask, tokens, mask, *a, **k):\n"
          "    n = mask.sum(1).long().tolist()\n"
          "    calls.append(dict(B=len(tokens), width=prompt_ids.shape[1] + tokens.shape[1],\n"
          "                      last=[int(tokens[i, n[i] - 1]) for i in range(len(n))]))\n"
          "    return orig(model, prompt_ids, prompt_mask, tokens, mask, *a, **k)\n"
          "rollout.completion_logprobs = rec\n"
          "sys.argv = ['train.py'] + sys.argv[1:]\n"
          "try:\n"
          "    runpy.run_path('train.py', run_name='__main__')\n"
          "finally:\n"
          "    json.dump(calls, open(os.environ['CALLS'], 'w'))\n")


def recorded(setup, out, *args, model=None):
    base = [f"--model={model or setup['model']}", f"--data={setup['data']}", f"--out_dir={out}", "--eval_every=0",
            "--prompts_per_step=4", "--prompts_per_update=4", "--max_new_tokens=12", "--num_steps=1", "--eval_n=2",
            "--fallbacks=last_number", "--lr=1e-3", "--threads=1"]
    p = subprocess.run([sys.executable, "-c", RECORD] + base + list(args), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "CALLS": str(out / "calls.json")})
    assert p.returncode == 0, p.stderr[-2000:]
    return json.load(open(out / "calls.json"))


def test_fsdp_checkpoint_resumes_exactly(setup, tmp_path):
    """FSDP2: rank 0 writes full tensors (the 1-process layout for the weights); 1 step + --resume for 1 more == 2 steps
    of 1 process. A checkpoint of the other kind is refused with one line (its optimizer state is keyed differently)."""
    data = mixed_data(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(setup, one, f"--data={data}").returncode == 0
    assert run(setup, two, f"--data={data}", "--num_steps=1", "--fsdp=True", torchrun=2).returncode == 0
    p = run(setup, two, f"--data={data}", "--fsdp=True", "--resume", torchrun=2)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-3000:]
    a, b = params(one), params(two)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4
    p = run(setup, one, f"--data={data}", "--resume", "--fsdp=True", "--num_steps=3", torchrun=2)
    # one whole line per rank that got to write it: torchrun may stop the other rank first
    lines = [line for line in p.stderr.splitlines() if "error:" in line]
    assert p.returncode != 0 and 'train.py", line' not in p.stderr and 1 <= len(lines) <= 2, p.stderr[-2000:]
    for line in lines:
        assert line.startswith("error:") and line.count("error:") == 1, p.stderr[-2000:]
        assert "written with --fsdp=False; resume with that setting" in line
    # exiting with a live gloo process group aborted ("terminate called without an active exception")
    assert "SIGABRT" not in p.stderr and "terminate called" not in p.stderr, p.stderr[-2000:]


def test_sample_mem_gib_chunks_generation_without_changing_it(setup, tmp_path):
    """--sample_mem_gib reaches generate: a budget of less than one row's cache decodes one row at a time, and
    the rollouts and rewards are the unchunked ones (each row draws from its own seed); the sampler's log-probs, so
    the mismatch and the parameters, move at float-noise level only (other batch shapes, other summation order)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(setup, a, "--k=4").returncode == 0
    count = ("import runpy, sys, rollout\n"  # train.py, printing the decode batch rows of each budgeted generate
             "orig = rollout.generate\n"
             "def gen(*a, **kw):\n"
             "    st = kw.setdefault('stats', {})\n"
             "    ro = orig(*a, **kw)\n"
             "    if kw.get('mem_budget'): print('rows', st['row_steps'] // max(st['steps'], 1))\n"
             "    return ro\n"
             "rollout.generate = gen\n"
             "sys.argv = ['train.py'] + sys.argv[1:]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    p = run(setup, b, "--k=4", "--sample_mem_gib=1e-9", "--eval_n=2", script=["-c", count])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("rows 1\n") == 2 and p.stdout.count("rows ") == 2  # 2 steps, one row in the cache at a time
    assert [s.split("| mismatch")[0] for s in steps(a)] == [s.split("| mismatch")[0] for s in steps(b)]
    pa, pb = params(a), params(b)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-4


def test_micro_batches_split_a_group_over_the_token_budget(setup, tmp_path):
    """A group of 8 rows (~62 tokens wide) with token_budget=200 is cut into row chunks of <= 200 padded tokens (kl_coef
    puts the reference pass through micro_batches too), and the parameters equal one micro-batch per mini-batch."""
    args = ["--k=8", "--kl_coef=0.05"]
    small = recorded(setup, tmp_path / "small", *args, "--token_budget=200")
    big = recorded(setup, tmp_path / "big", *args)
    assert max(c["width"] for c in small) * 3 <= 200 and max(c["B"] * c["width"] for c in small) <= 200
    assert max(c["B"] for c in big) >= 8  # without the budget a whole group (or more) is one call
    a, b = params(tmp_path / "small"), params(tmp_path / "big")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_offline_dpo_ends_responses_with_the_end_of_turn_token(setup, tmp_path):
    """The chat template closes an assistant turn with <|im_end|> (id 2); a tokenizer whose eos is another, lower id
    (Qwen base models: <|endoftext|>) must not end the preference responses with it."""
    import shutil
    d = tmp_path / "model"
    shutil.copytree(setup["model"], d)
    tc = json.load(open(d / "tokenizer_config.json"))
    json.dump({**tc, "eos_token": "<|im_start|>"}, open(d / "tokenizer_config.json", "w"))
    calls = recorded(setup, tmp_path, "--algo=dpo_offline", f"--data={setup['prefs']}", model=d)
    assert calls and all(t == 2 for c in calls for t in c["last"]), calls


def test_norm_dropped_counts_dropped_rows_in_the_divisor(setup, tmp_path):
    """seq_mean, one update: with --norm_dropped the gradient is the kept-rows-only gradient times kept / all groups
    (verl/TRL: the divisor is every row of the mini-batch). Adam's first moment after one step is (1 - beta1) * grad."""
    args = ["--num_steps=1", "--prompts_per_update=8", "--grad_clip=0"]
    assert run(setup, tmp_path / "kept", *args).returncode == 0
    p = run(setup, tmp_path / "all", *args, "--norm_dropped=True")
    assert p.returncode == 0, p.stderr[-2000:]
    zero_var = float(steps(tmp_path / "all")[0].split("zero_var ")[1].split()[0])
    kept = round(8 * (1 - zero_var))
    assert 0 < kept < 8 and steps(tmp_path / "all")[0].split("| clip_low")[0] == steps(tmp_path / "kept")[0].split("| clip_low")[0]
    a, b = [torch.load(tmp_path / d / "ckpt.pt", weights_only=False)["optimizer"]["state"] for d in ("kept", "all")]
    for i in a:
        ga, gb = a[i]["exp_avg"], b[i]["exp_avg"]
        assert torch.allclose(gb, ga * kept / 8, rtol=1e-4, atol=1e-9 * ga.abs().max().item())


def test_resume_refuses_a_changed_lr(setup, tmp_path):
    """The restored optimizer keeps its own lr: a resume with another --lr is one error line, not a silent no-op."""
    assert run(setup, tmp_path, "--num_steps=1").returncode == 0
    line = one_error_line(run(setup, tmp_path, "--num_steps=2", "--resume", "--lr=2e-3"))
    assert "--lr=0.002 (checkpoint: 0.001)" in line


def test_crash_during_save_keeps_last_checkpoint(setup, tmp_path):
    """Kill the process in the middle of writing the second checkpoint: the first stays loadable and resumable."""
    crash = ("import os, runpy, sys, torch\n"
             "orig, n = torch.save, [0]\n"
             "def save(obj, f, *a, **k):\n"
             "    n[0] += 1\n"
             "    if n[0] == 2:\n"
             "        f.write(b'half a checkpoint'); f.flush(); os._exit(9)\n"
             "    orig(obj, f, *a, **k)\n"
             "torch.save = save\n"
             "sys.argv = ['train.py'] + sys.argv[1:]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")
    base = [f"--model={setup['model']}", f"--data={setup['data']}", f"--out_dir={tmp_path}", "--prompts_per_step=4",
            "--prompts_per_update=4", "--max_new_tokens=8", "--num_steps=3", "--save_every=1", "--eval_every=0",
            "--eval_n=2", "--fallbacks=last_number"]
    p = subprocess.run([sys.executable, "-c", crash] + base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 9
    assert os.path.exists(tmp_path / "ckpt.pt.tmp")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["state"]["step"] == 1
    p = subprocess.run([sys.executable, "train.py"] + base + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "resumed from" in p.stdout and "at step 1" in p.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["state"]["step"] == 3


# ---------------------------------------------------------------------------- bad input: one line, exit 2

def one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


@pytest.mark.parametrize("args,expect", [
    (["--lerning_rate=1e-5"], "did you mean 'lr'"),
    (["--prompts_per_stp=8"], "did you mean 'prompts_per_step'"),
    (["--k=two"], "cannot parse 'two' as int"),
    (["--k=2.5"], "k must be int"),
    (["--algo=ppo"], "expected grpo, dpo or dpo_offline"),
    (["configs/does_not_exist.py"], "does_not_exist.py"),
    (["--model=/no/such/model"], "model not found"),
    (["--prompts_per_update=3"], "must be a multiple"),
    (["--train_n=-1"], "--train_n=-1: a number of training problems >= 0"),
    (["--train_n=8", "--algo=dpo_offline"], "dpo_offline reads every preference pair"),
    (["--resample=True", "--kl_coef=0.05"], "with a KL term no group is dropped, so RS would refill nothing"),
    (["--norm_dropped=True", "--resample=True"], "drop --norm_dropped"),
    (["--fsdp=True"], "shards over the ranks of torchrun"),
    (["--sample_mem_gib=-1"], "a budget in GiB > 0, or 0"),
])
def test_config_and_path_errors(setup, tmp_path, args, expect):
    assert expect in one_error_line(run(setup, tmp_path, *args))


def test_malformed_data_file(setup, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    assert "bad.jsonl" in one_error_line(run(setup, tmp_path, f"--data={bad}"))
    mixed = tmp_path / "mixed.jsonl"  # malformed lines are skipped and counted, the rest trains
    mixed.write_text(open(setup["data"]).read() + "not json\n{}\n")
    p = run(setup, tmp_path / "m", f"--data={mixed}", "--num_steps=1")
    assert p.returncode == 0 and "skipped 2 of " in p.stderr and "malformed" in p.stderr


def test_corrupt_checkpoint(setup, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02 definitely not a checkpoint")
    line = one_error_line(run(setup, tmp_path, "--resume"))
    assert "ckpt.pt" in line and "corrupt" in line


def test_config_file_and_wandb_offline(setup, tmp_path):
    cfgfile = tmp_path / "c.py"
    cfgfile.write_text("# a config file is plain assignments\nk = 4\nprompts_per_step = 4\nprompts_per_update = 4\n")
    p = run(setup, tmp_path, str(cfgfile), "--wandb=True", "--num_steps=1",
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "'k': 4" in p.stdout.splitlines()[0] and os.path.isdir(tmp_path / "wandb")


def test_every_config_file_uses_known_keys():
    """configs/*.py only assign fields of train.py's Config (read with ast: train.py is a script, not a module)."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    cfg = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    known = {n.target.id for n in cfg.body if isinstance(n, ast.AnnAssign)}
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))
    assert {"grpo2.py", "grpo16.py", "grpo2_rs.py", "dpo.py", "smoke.py"} <= set(files)
    for f in files:
        src = open(os.path.join(ROOT, "configs", f)).read()
        assert src.startswith("#"), f"{f} should open with what it runs, the expected result and runtime"
        names = {t.id for n in ast.parse(src).body if isinstance(n, ast.Assign) for t in n.targets}
        assert names and names <= known, (f, names - known)


def test_help_lists_every_key():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--prompts_per_update=32" in p.stdout and "--lr=1e-05" in p.stdout


def test_bench_rejects_unknown_arguments():
    """bench.py takes minutes: a typo must be an error, not a silent run with the defaults."""
    p = subprocess.run([sys.executable, "bench.py", "--step=5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unknown argument '--step=5'" in p.stderr and "Traceback" not in p.stderr


def test_progress_bar_on_a_terminal_only(setup, tmp_path):
    """On a terminal a tqdm step bar runs below the log lines; piped (logs, CI) there is none."""
    import fcntl, pty, struct, termios
    master_fd, slave_fd = pty.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    base = [f"--model={setup['model']}", f"--data={setup['data']}", f"--out_dir={tmp_path}", "--prompts_per_step=4",
            "--prompts_per_update=4", "--max_new_tokens=8", "--num_steps=2", "--eval_n=2", "--eval_every=0",
            "--threads=1"]
    chunks = []

    def drain():  # read the terminal side while the child runs, so a full pty buffer cannot block it
        while True:
            try:
                chunk = os.read(master_fd, 65536)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    p = subprocess.Popen([sys.executable, "train.py"] + base, cwd=ROOT, stdout=subprocess.PIPE, stderr=slave_fd)
    os.close(slave_fd)
    out = p.communicate(timeout=300)[0].decode()
    reader.join(timeout=10)
    os.close(master_fd)
    tty = b"".join(chunks)
    assert p.returncode == 0 and out.count("\nstep ") + out.startswith("step ") == 2
    assert b"2/2" in tty and (b"step/s" in tty or b"s/step" in tty)
    piped = run(setup, tmp_path / "piped")
    assert piped.returncode == 0 and "s/step" not in piped.stderr and "step/s" not in piped.stderr
