"""Issue 25's classes, each at its mechanism: no run is lost (a lock, no silent overwrite, atomic files, a full disk,
Ctrl-C), none is silently empty (no update, the held-out split, prompts over the context, the top answer), and every bad
input is one clear line. train.py and eval.py run as users run them, on a tiny random model; most cases stop before
any weights load. Run: python -m pytest -q tests/test_reliability.py"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
from conftest import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model that often says "1", "2", spaces or stops, and 40 problems whose answer is 1."""
    d = tmp_path_factory.mktemp("rel")
    model = make_tiny(d / "model", "llama", favour=("1", "2", "Ġ", "<|im_end|>"))
    data = d / "ones.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "1"}) + "\n" for i in range(40)))
    return dict(model=model, data=str(data), dir=d)


def base(setup, out, data=None):
    return [f"--model={setup['model']}", f"--data={data or setup['data']}", f"--out_dir={out}", "--prompts_per_step=4",
            "--prompts_per_update=4", "--max_new_tokens=8", "--num_steps=1", "--eval_n=2", "--eval_every=0",
            "--fallbacks=last_number", "--lr=1e-3", "--threads=1", "--sample_every=0"]


def train(setup, out, *args, data=None, prefix=()):
    return subprocess.run([sys.executable, *prefix, "train.py"] + base(setup, out, data) + list(args), cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(p):
    assert p.returncode == 2, (p.returncode, p.stdout[-1000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def ckpt_step(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["state"]["step"]


# ---------------------------------------------------------------------------- no run is lost

def test_a_checkpoint_is_never_replaced_unasked(setup, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"a finished run")
    line = one_error_line(train(setup, tmp_path))
    assert "ckpt.pt holds a run" in line and "--resume" in line and "--overwrite=True" in line
    assert (tmp_path / "ckpt.pt").read_bytes() == b"a finished run"
    p = train(setup, tmp_path, "--overwrite=True")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--overwrite: removed the previous run's ckpt.pt" in p.stdout and ckpt_step(tmp_path) == 1


def test_one_trainer_per_out_dir_and_a_dead_ones_leftovers_are_cleared(setup, tmp_path):
    lock = config.lock_dir(str(tmp_path))  # another trainer (this process) holds the out_dir
    line = one_error_line(train(setup, tmp_path))
    assert f"is in use by pid {os.getpid()} on " in line and "another --out_dir" in line
    lock.close()  # that trainer dies: its lock file stays, the kernel's lock goes, a new run takes over
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"\0" * 2_000_000)  # a save that did not finish
    p = train(setup, tmp_path, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "ckpt.pt.tmp (2 MB), left by a save that did not finish" in p.stdout
    assert "--resume: there is no checkpoint at" in p.stdout and "starting from scratch" in p.stdout
    assert not (tmp_path / "ckpt.pt.tmp").exists() and ckpt_step(tmp_path) == 1


FULL_DISK = ("import errno, os, runpy, sys, torch\n"
             "orig, n = torch.save, [0]\n"
             "def save(obj, f, *a, **k):\n"
             "    n[0] += 1\n"
             "    if n[0] == 2:\n"
             "        f.write(b'half a checkpoint'); raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
             "    orig(obj, f, *a, **k)\n"
             "torch.save = save\n"
             "sys.argv = ['train.py'] + sys.argv[1:]\n"
             "runpy.run_path('train.py', run_name='__main__')\n")


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(setup, tmp_path):
    p = subprocess.run([sys.executable, "-c", FULL_DISK] + base(setup, tmp_path) + ["--num_steps=2", "--save_every=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_error_line(p)
    assert f"cannot save {tmp_path / 'ckpt.pt'}: no space left on {tmp_path}" in line and "--resume" in line
    assert not (tmp_path / "ckpt.pt.tmp").exists() and ckpt_step(tmp_path) == 1


def test_atomic_write(tmp_path):
    path = str(tmp_path / "r.json")
    config.atomic_write(path, lambda f: f.write(b"first"))

    def fail(err):
        def write(f):
            f.write(b"half")
            raise err
        return write
    with pytest.raises(OSError, match=f"no space left on {tmp_path}"):
        config.atomic_write(path, fail(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(KeyboardInterrupt):
        config.atomic_write(path, fail(KeyboardInterrupt()))
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["r.json"]


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(setup, tmp_path):
    p = subprocess.Popen([sys.executable, "train.py"] + base(setup, tmp_path) + ["--num_steps=1000", "--save_every=1"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in p.stdout:  # step 1's line comes after its checkpoint (saved at the top of step 1)
            if line.startswith("step 0001/"):
                break
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err
    stop = err.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted after step \d+ of 1000; continue from .*ckpt\.pt with: python train\.py .*", stop)
    assert stop.endswith(" --resume") and f"--out_dir={tmp_path}" in stop and ckpt_step(tmp_path) >= 1


def test_eval_checks_out_before_the_work(setup, tmp_path):
    p = subprocess.run([sys.executable, "eval.py", f"--model={setup['model']}", f"--out={tmp_path}", "--n_problems=2",
                        "--max_new_tokens=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_error_line(p)
    assert f"--out={tmp_path} is a directory" in line and "mean@1" not in p.stdout  # refused before any problem ran


# ---------------------------------------------------------------------------- no run is silently empty

def test_a_run_without_updates_warns_and_logs_its_top_answer(setup, tmp_path):
    never = tmp_path / "never.jsonl"  # an answer the model cannot give: every group has equal rewards (all 0)
    never.write_text("".join(json.dumps({"prompt": f"q {i}", "answer": "zzz"}) + "\n" for i in range(40)))
    p = train(setup, tmp_path / "out", "--num_steps=3", "--eval_n=0", data=never)
    assert p.returncode == 0, p.stderr[-2000:]
    from data import load_problems  # no --eval_data: the file's two sides of the hash split (see the next test)
    n_train, n_test = (len(load_problems(str(never), s, holdout=True)) for s in ("train", "test"))
    assert n_train + n_test == 40 and f"{n_train} training items, {n_test} held-out problems" in p.stdout
    assert "warning: no update in the last 3 steps" in p.stdout
    assert "warning: this run made no update in any of its 3 steps" in p.stdout
    for line in [line for line in p.stdout.splitlines() if line.startswith("step ")]:  # 8 rollouts a step
        share = float(re.search(r"\| top (?:'[^']*'|none) ([\d.]+) \|", line).group(1))
        assert any(abs(share - n / 8) < 0.006 for n in range(1, 9)), line


def test_a_file_without_eval_data_is_split_never_scored_on_training_rows(setup):
    from data import load_problems
    everything = load_problems(setup["data"])
    train_, test = (load_problems(setup["data"], s, holdout=True) for s in ("train", "test"))
    assert test and train_ and not {p["prompt"] for p in train_} & {p["prompt"] for p in test}
    assert len(train_) + len(test) == len(everything) == 40
    assert load_problems(setup["data"], "test", n=3, seed=5, holdout=True) == \
        load_problems(setup["data"], "test", n=3, seed=5, holdout=True)  # a fixed split; n samples within it
    assert {p["prompt"] for p in load_problems(setup["data"], "test", n=3, seed=5, holdout=True)} <= \
        {p["prompt"] for p in test}


def test_a_prompt_over_the_context_is_refused_at_load(setup, tmp_path):
    data = tmp_path / "long.jsonl"  # the tiny model's context is 512 tokens; its tokenizer has one token a byte
    data.write_text(open(setup["data"]).read() + json.dumps({"prompt": "long " * 200, "answer": "1"}) + "\n")
    line = one_error_line(train(setup, tmp_path / "out", data=data))
    assert "1 prompt(s) longer than the 504 tokens the model's context leaves after max_new_tokens" in line
    assert "'long long long" in line


# ---------------------------------------------------------------------------- one clear line, never a traceback

@pytest.mark.parametrize("case", ["file", "unwritable"])
def test_a_bad_out_dir_is_one_line(setup, tmp_path, case):
    (tmp_path / "a_file").write_text("x")
    args, expect = {"file": ([f"--out_dir={tmp_path / 'a_file'}"], "is a file, not a directory"),
                    "unwritable": (["--out_dir=/proc/nanogrpo_out"], "cannot write there")}[case]
    assert expect in one_error_line(train(setup, tmp_path / "out", *args))


def test_bad_config_json_names_the_file(setup, tmp_path):
    from model import from_pretrained
    d = tmp_path / "m"
    shutil.copytree(setup["model"], d)
    hf = json.loads((d / "config.json").read_text())
    del hf["hidden_size"], hf["intermediate_size"]
    (d / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=re.escape(f"{d / 'config.json'}: missing hidden_size, intermediate_size")):
        from_pretrained(str(d))
    p = subprocess.run([sys.executable, "eval.py", f"--model={d}", f"--out={tmp_path / 'e.json'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert "missing hidden_size" in one_error_line(p)
    (d / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=re.escape(f"{d / 'config.json'}: not valid JSON")):
        from_pretrained(str(d))


def test_non_utf8_data_names_the_file(tmp_path):
    from data import load_problems
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "caf\u00e9 costs 3", "answer": "3"}\n'.encode("latin-1"))  # a Windows export
    with pytest.raises(ValueError, match=re.escape(f"{path}: not UTF-8 text")):
        load_problems(str(path))


@pytest.mark.parametrize("content,what", [(b"", "an empty file"), (bytes(range(256)) * 16, "not a torch.save archive")],
                         ids=["empty", "random"])
def test_a_file_that_is_not_a_checkpoint_says_so(setup, tmp_path, content, what):
    from config import load_checkpoint
    (tmp_path / "ckpt.pt").write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert f"ckpt.pt is not a checkpoint ({what})" in str(e.value)
    assert "zip" not in str(e.value) and "mmap" not in str(e.value)
    if not content:  # and train.py --resume says the same in one line
        assert "is not a checkpoint (an empty file)" in one_error_line(train(setup, tmp_path, "--resume"))


def test_an_unreachable_hub_fails_fast(monkeypatch):
    from data import load_problems

    class Datasets:  # datasets retries for ~30 s offline: it must not even be called
        @staticmethod
        def load_dataset(*a, **k):
            raise AssertionError("load_dataset called with the hub unreachable")
    monkeypatch.setitem(sys.modules, "datasets", Datasets)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    t0 = time.time()
    with pytest.raises(ValueError, match=r"http://127.0.0.1:9 is unreachable \(offline\?\)"):
        load_problems("hf:openai/gsm8k:main", "test")
    assert time.time() - t0 < 10
