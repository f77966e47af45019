"""Several processes and safe checkpoints: a checkpoint that would run code when unpickled is refused (train.py --resume
and eval.py), with one error line and without running it.
Run: python -m pytest -q tests/test_dist.py"""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    data = d / "ones.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "1"}) + "\n" for i in range(16)))
    return dict(model=make_tiny(d / "model", "llama", favour=("1", "2", "Ġ", "<|im_end|>")), data=str(data))


def train(setup, out, *args, nproc=0):
    base = [f"--model={setup['model']}", f"--data={setup['data']}", f"--out_dir={out}", "--prompts_per_step=8",
            "--prompts_per_update=4", "--max_new_tokens=12", "--num_steps=1", "--eval_n=2", "--eval_every=0",
            "--fallbacks=last_number", "--lr=1e-3", "--threads=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port=29531"] \
        if nproc else [sys.executable]
    return subprocess.run(launcher + ["train.py"] + base + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


class RunsCode:
    """Unpickling this calls os.system: what a checkpoint from someone else could do under weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_runs_code_is_refused(setup, tmp_path):
    import eval as ev
    out = tmp_path / "out"
    p = train(setup, out)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # what train.py writes loads with weights_only
    assert ev.load_model(str(out))[0] is not None
    marker = tmp_path / "code_ran"
    ckpt["state"]["note"] = RunsCode(marker)
    torch.save(ckpt, out / "ckpt.pt")
    p = train(setup, out, "--resume", "--num_steps=2")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "refused to load" in lines[0] and "ckpt.pt" in lines[0] and "system" in lines[0], p.stderr
    with pytest.raises(ValueError, match="refused to load.*could run code"):
        ev.load_model(str(out))
    assert not marker.exists()


# train.py with every write to stderr recorded: sys.stderr's and os.write's on fd 2
RECORD_WRITES = r"""
import json, os, runpy, sys
writes, real_write, real_stderr = [], os.write, sys.stderr
class Rec:
    def write(self, s):
        writes.append(s)
        return real_stderr.write(s)
    def flush(self):
        real_stderr.flush()
def write(fd, b):
    if fd == 2:
        writes.append(b.decode())
    return real_write(fd, b)
sys.stderr, os.write = Rec(), write
sys.argv = ["train.py"] + sys.argv[2:]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    json.dump(writes, open(os.environ["WRITES"], "w"))
"""


def test_an_error_line_is_one_write(tmp_path):
    """Under torchrun every rank writes to the same stderr pipe: a line written in pieces (print writes the text, then
    the newline) interleaves with another rank's, which made test_fsdp_checkpoint_resumes_exactly count 1 line for 2.
    One write() of a line under PIPE_BUF (4096 bytes) is atomic on a pipe."""
    p = subprocess.run([sys.executable, "-c", RECORD_WRITES, "-", "--k=two"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "WRITES": str(tmp_path / "w.json")})
    assert p.returncode == 2 and p.stderr.count("error:") == 1, p.stderr[-2000:]
    pieces = [w for w in json.load(open(tmp_path / "w.json")) if w.strip()]
    assert any("error:" in w for w in pieces)
    for w in pieces:
        assert w.count("\n") == 1 and w.endswith("\n") and len(w.encode()) < 4096, pieces
