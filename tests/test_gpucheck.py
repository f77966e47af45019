"""gpucheck.py (issue 23) kept alive on a CPU: `--device=cpu --tiny` runs every part end to end at toy sizes, each in
its own process, and reports every part with a status in gpucheck.json and gpucheck.md; the parts a CPU can run pass
(the CUDA-only ones say "skipped: no CUDA" after running what they can). Also: the sampler part's forced stop times
give the paper-like length distribution it claims.
Run: python -m pytest -q tests/test_gpucheck.py"""
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import gpucheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paper_lengths():
    """Mean a quarter of the window, ~10% run to its end, every length in 1..W."""
    for R, W in [(256, 3072), (1024, 3072), (256, 128)]:
        lens = gpucheck.paper_lengths(R, W)
        assert len(lens) == R and min(lens) >= 1 and max(lens) == W
        assert abs(sum(lens) / R / W - 0.25) < 0.01
        assert abs(sum(n == W for n in lens) / R - 0.1) < 0.01


def test_control_stops_forces_lengths():
    """A random model with control_stops: greedy and T=1 sampling both stop exactly where the prompt says."""
    import torch
    import rollout
    from model import Transformer
    cfg = gpucheck.model_config("tiny-qwen2", tie_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    new, base = 12, cfg.vocab_size - 20
    gpucheck.control_stops(model, base, new)
    lens = [1, 3, 7, 12, 12]
    prompts = [[5, 6, 7 + i] + [base + n - 1 + (n == new and i == 4)] for i, n in enumerate(lens)]  # last: 13
    for t in (0.0, 1.0):
        ro = rollout.generate(model, prompts, max_new_tokens=new, temperature=t, stop_ids=[gpucheck.STOP], seed=0)
        assert ro.mask.sum(1).long().tolist() == lens
        assert ro.finish == ["eos"] * 4 + ["length"]


def test_a_part_past_its_deadline_is_killed_and_keeps_its_rows():
    """What a part printed before its timeout is kept; the timeout is a FAIL row; its process group is gone."""
    row = json.dumps(dict(name="a", status="pass", value="1"))
    code = f"import time; print('ROW ' + {row!r}, flush=True); time.sleep(60)"
    out = tempfile.TemporaryFile("w+")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    job = dict(part="x", proc=p, out=out, t0=time.time(), deadline=time.time() + 5)
    rows = gpucheck.finish_part(job, io.StringIO())
    assert [r["name"] for r in rows] == ["a", "process"] and rows[0]["status"] == "pass"
    assert rows[1]["status"] == "FAIL" and rows[1]["value"].startswith("timed out"), rows
    assert p.poll() is not None


def test_cpu_tiny_end_to_end(tmp_path):
    p = subprocess.run([sys.executable, "gpucheck.py", "--device=cpu", "--tiny", f"--out={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    md = (tmp_path / "gpucheck.md").read_text()
    parts = {part["name"]: part for part in report["parts"]}
    assert list(parts) == gpucheck.PARTS, p.stdout[-3000:]
    failed = {n: [r for r in part["rows"] if r["status"] == "FAIL"] for n, part in parts.items()}
    assert not any(failed.values()), (failed, p.stdout[-3000:])
    for name, part in parts.items():
        assert part["rows"] and all(r["status"] in ("pass", "info") or r["status"].startswith("skipped")
                                    for r in part["rows"]), part
        assert f"| {name} | " in md
    assert parts["tests"]["status"] == "skipped"
    assert parts["attention"]["status"] in ("skipped", "pass")  # ran on the CPU: a row per SDPA call kind (+ info)
    assert sum("decode" in r["name"] for r in parts["attention"]["rows"]) >= 1
    for name in ("parity", "train", "update", "sampler_eager", "generate_hf", "sampler_compiled"):
        assert parts[name]["status"] == "pass", parts[name]
    assert len(parts["train"]["rows"]) == 5  # plain, --fsdp, --compile, --resume, eval.py
    assert p.returncode == 0, p.stdout[-3000:]
