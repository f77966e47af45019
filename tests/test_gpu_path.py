"""The GPU path's mechanisms, shown on a CPU (gpu-audit.md items 1, 3, 4, 6): collectives on the device NCCL needs,
resume onto a device that is not the CPU, every documented train.py command getting past the refusals, and eval
sharded over ranks equal to one process. What a CPU cannot show is listed in README.md's GPU section.
Run: python -m pytest -q tests/test_gpu_path.py"""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import make_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce_scatter", "all_to_all", "gather_object", "scatter_object_list", "monitored_barrier"}


def test_collectives_run_on_the_device():
    """NCCL serves only CUDA tensors (a CPU tensor: "No backend type associated with device type cpu"). train.py's
    all_sum, run with ddp on and a device that is not the CPU (meta stands in for cuda), must hand its collective a
    tensor on that device; and every other collective in train.py / eval.py must be on a tensor that lives on the
    device (gradients) or go through torch's object collectives (NCCL: torch.cuda.current_device(), set by train.py)."""
    src = open(os.path.join(ROOT, "train.py")).read()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "all_sum")
    seen = []

    class Reached(Exception):
        pass

    class FakeDist:
        ReduceOp = torch.distributed.ReduceOp

        @staticmethod
        def all_reduce(t, op=None):
            seen.append(t.device)
            raise Reached  # a meta tensor has no value to return

    ns = dict(torch=torch, dist=FakeDist, ddp=True, device=torch.device("meta"))
    exec(compile(ast.Module([fn], []), "train.py", "exec"), ns)
    with pytest.raises(Reached):
        ns["all_sum"](3)
    assert seen == [torch.device("meta")], f"all_sum reduces a tensor on {seen}, not on the training device"
    # every other collective call: in all_sum, gather (object collective), or on a gradient (on the device)
    for name in ("train.py", "eval.py"):
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        funcs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in COLLECTIVES:
                where = max([f for f in funcs if f.lineno <= call.lineno <= f.end_lineno], key=lambda f: f.lineno,
                            default=None)
                arg = ast.unparse(call.args[0]) if call.args else ""
                ok = (where and where.name == "all_sum") or call.func.attr.endswith("_object") or arg == "p.grad" or \
                    call.func.attr == "barrier"  # no tensor of ours (NCCL's runs on the device set_device chose)
                assert ok, f"{name}:{call.lineno}: {ast.unparse(call)}: use all_sum (tensors on `device`)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_path")
    data = d / "ones.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}: say one", "answer": "1"}) + "\n" for i in range(16)))
    return dict(model=make_tiny(d / "model", "llama", favour=("1", "2", "Ġ", "<|im_end|>")), data=str(data), dir=d)


def test_resume_onto_a_device_that_is_not_the_cpu(tiny, tmp_path):
    """The checkpoint is read onto the CPU and moved where it belongs: RNG states stay CPU byte tensors. On 8719fb2
    it was read onto `device`, and on CUDA torch.set_rng_state raised "RNG state must be a torch.ByteTensor". Here
    --device=meta stands in for cuda: a resume at the last step loads everything and runs no forward."""
    from config import load_checkpoint
    base = [sys.executable, "train.py", f"--model={tiny['model']}", f"--data={tiny['data']}", f"--out_dir={tmp_path}",
            "--prompts_per_step=2", "--prompts_per_update=2", "--max_new_tokens=4", "--num_steps=1", "--eval_n=2",
            "--eval_every=0", "--threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    ckpt = load_checkpoint(str(tmp_path / "ckpt.pt"))
    tensors = [v for v in ckpt["model"].values()] + [ckpt["rng"]["torch"]]
    assert all(t.device.type == "cpu" for t in tensors)
    torch.set_rng_state(ckpt["rng"]["torch"])  # a CPU ByteTensor
    with pytest.raises(TypeError, match="ByteTensor"):  # the audit's repro: the same state read onto another device
        torch.set_rng_state(torch.load(tmp_path / "ckpt.pt", map_location="meta", weights_only=True)["rng"]["torch"])
    p = subprocess.run(base + ["--resume", "--device=meta"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-2000:]


# every train.py command README.md, train.py's docstring and the config headers show, run as shown up to loading the
# model (one process; torchrun commands as rank 0 of 1): no refusal on the way, and the process group's timeout
RUN_DOCUMENTED = r"""
import datetime, json, os, runpy, sys
import torch.distributed as dist
import model
class Reached(Exception):
    pass
def stop(*a, **k):
    raise Reached
model.from_pretrained = stop
timeouts, init = [], dist.init_process_group
def rec(*a, **k):
    timeouts.append(k.get("timeout", datetime.timedelta(minutes=10)).total_seconds())  # NCCL's default
    return init(*a, **k)
dist.init_process_group = rec
out, (cmds, out_dir, res) = [], sys.argv[1:4]
for argv, nproc in json.load(open(cmds)):
    sys.argv = ["train.py"] + argv + [f"--out_dir={out_dir}/{len(out)}"]  # one each: a run holds its out_dir's lock
    if nproc:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29547")
    try:
        runpy.run_path("train.py", run_name="__main__")
        code = "ran"
    except Reached:
        code = "reached"
    except SystemExit as e:
        code = e.code
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    out.append(code)
json.dump(dict(codes=out, timeouts=timeouts), open(res, "w"))
"""
COMMAND = re.compile(r"(python|torchrun((?:\s+--[\w-]+=\S+)*))\s+train\.py((?:[ \t]+(?:configs/[\w.]+\.py|--\w+(?:=[\w.:/,+-]+)?))*)")


def documented_commands():
    texts = [open(os.path.join(ROOT, "README.md")).read(), ast.get_docstring(ast.parse(open(os.path.join(ROOT, "train.py")).read()))]
    texts += [open(os.path.join(ROOT, "configs", f)).read() for f in sorted(os.listdir(os.path.join(ROOT, "configs")))
              if f.endswith(".py")]
    cmds = {}
    for text in texts:
        for m in COMMAND.finditer(text):
            nproc = int(re.search(r"--nproc_per_node=(\d+)", m.group(2)).group(1)) if m.group(2) else 0
            cmds[(m.group(3).strip(), nproc)] = None
    return [(args.split(), nproc) for args, nproc in cmds]


def test_documented_commands_run_as_shown(tmp_path):
    """On 8719fb2 `torchrun ... train.py configs/qwen_math_grpo16.py --fsdp=True` (train.py's docstring) was refused at
    once: the config sets compile and FSDP with compile was refused after --dry_run had said it fits."""
    cmds = documented_commands()
    assert any("--fsdp=True" in a for a, n in cmds if n) and any(n == 0 and not a for a, n in cmds), cmds
    (tmp_path / "cmds.json").write_text(json.dumps(cmds))
    p = subprocess.run([sys.executable, "-c", RUN_DOCUMENTED, str(tmp_path / "cmds.json"), str(tmp_path / "out"),
                        str(tmp_path / "res.json")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(tmp_path / "res.json"))
    refused = [(" ".join(a), code) for (a, _), code in zip(cmds, res["codes"]) if code not in ("reached", 0)]
    assert not refused, (refused, p.stderr[-2000:])
    # a rank generating (or evaluating) for an hour while the others wait must not trip NCCL's watchdog (10 min)
    assert res["timeouts"] and min(res["timeouts"]) >= 3600, res["timeouts"]


SHARDED_EVAL = r"""
import json, sys
import torch.distributed as dist
from data import load_problems
from eval import evaluate
from model import from_pretrained
dist.init_process_group("gloo")
torch_model, tok = from_pretrained(sys.argv[1])
res = evaluate(torch_model, tok, load_problems(sys.argv[2], "train")[:7], n=2, temperature=1.0, max_new_tokens=6,
               batch_size=4, fallbacks=("last_number",), seed=3, shard=(dist.get_rank(), dist.get_world_size()))
json.dump(res, open(sys.argv[3] + str(dist.get_rank()), "w"))
dist.barrier()  # as train.py ends: no rank tears down while another still talks to it
dist.destroy_process_group()
"""


def test_sharded_eval_equals_one_process(tiny, tmp_path):
    """2 gloo ranks each evaluate every other problem (7: uneven shards, several batches, sampling at T=1 so the
    per-row seeds matter) and gather: every metric equals one process's, on both ranks. On 8719fb2 rank 0 evaluated
    alone while the others waited in a barrier that outlives NCCL's 10-minute watchdog on a long eval."""
    from data import load_problems
    from eval import evaluate
    from model import from_pretrained
    script = tmp_path / "sharded_eval.py"
    script.write_text(SHARDED_EVAL)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29548",
                        str(script), tiny["model"], tiny["data"], str(tmp_path / "res")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr[-3000:]
    m, tok = from_pretrained(tiny["model"])
    one = evaluate(m, tok, load_problems(tiny["data"], "train")[:7], n=2, temperature=1.0, max_new_tokens=6,
                   batch_size=16, fallbacks=("last_number",), seed=3)
    assert 0 < one["acc"] < 1, one  # mixed answers: a wrong order or seed would show
    for r in (0, 1):
        assert json.load(open(str(tmp_path / "res") + str(r))) == one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL, CUDA RNG)")
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_nccl_train_eval_resume_cuda(tiny, tmp_path, fsdp):
    """On a GPU, what the CPU tests above stand in for: torchrun + NCCL (1 rank still takes NCCL's device rule:
    every all_sum, the sharded eval's gather), a checkpoint written from CUDA and resumed on CUDA, with and without
    FSDP2. On 8719fb2 the first all_sum raised "No backend type associated with device type cpu"."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29549", "train.py",
            f"--model={tiny['model']}", f"--data={tiny['data']}", f"--out_dir={tmp_path}", "--prompts_per_step=4",
            "--prompts_per_update=2", "--max_new_tokens=8", "--eval_n=4", "--eval_every=1", f"--fsdp={fsdp}"]
    for args in (["--num_steps=1"], ["--num_steps=2", "--resume"]):
        p = subprocess.run(base + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "eval step" in p.stdout, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "on cuda" in p.stdout
