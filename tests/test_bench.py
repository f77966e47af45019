"""plan.py (train.py --dry_run) and bench.py on CPU: the plan's arithmetic by hand on a small config, its memory lines
against real tensors (KV cache, parameters, what autograd saves), the refusals, and bench.py's CPU-only checks.
Run: python -m pytest -q tests/test_bench.py"""
import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import bench
import plan
from model import KVCache, ModelConfig, Transformer, chat_ids, from_pretrained, stop_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a llama of 2 blocks: dim 64, 4 heads / 2 kv heads of 16, SwiGLU 128, vocab 1000, tied
TINY = dict(model_type="llama", vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return str(tmp_path)


def cfg(model, **kw):
    base = dict(model=model, gpu="l4", gpus=2, prompts_per_step=8, prompts_per_update=4, k=4, max_new_tokens=64,
                token_budget=1000, dtype="float32", grad_ckpt=False, compile=False, kl_coef=0.0, algo="grpo",
                num_steps=10, fsdp=False, sample_mem_gib=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_plan_by_hand(tiny):
    p = plan.plan(cfg(tiny))
    # params: embedding 64000 (tied head) + 2 x (norms 128 + q 4096 + k 2048 + v 2048 + o 4096 + mlp 24576) + 64
    assert p["N"] == 138048
    # 8 prompts / 2 GPUs x k=4 = 16 rows of 256 + 64 = 320 columns, all 16 decoded at once (no budget); fp32 sampling:
    # K and V fp32, 2 x 2 blocks x 32 x 4 = 512 B a token; eager compaction copies live rows (<= 3/4) once (x 1.75)
    assert (p["rows"], p["S"], p["slots"]) == (16, 320, 16)
    assert p["roll"]["kv"] == 16 * 320 * 512 * 1.75 == 4587520
    assert p["roll"]["sampler"] == 4 * 16 * 1000 * 4 and p["roll"]["copy"] == p["roll"]["pool"] == 0
    # fp32 block: 4 x (4 x 64 + 4 heads + 2) + 8 x 64 + 4 x (2 x 64 + 2 x 32 + 4 x 128) = 4376 B a token, 2 blocks,
    # 1000 tokens (token_budget > one row's 320)
    assert p["upd"]["acts"] == 1000 * 2 * 4376 == 8752000
    assert p["upd"]["logits"] == 1000 * 1000 * 4
    assert p["upd"]["weights"] == p["upd"]["grads"] == 552192 and p["upd"]["adamw"] == 1104384
    assert p["peak"] == 552192 * 2 + 1104384 + 8752000 + 4000000 == 14960768
    # L4 (fp32 as TF32: 60.5 TFLOP/s, 300 GB/s): 16 rows x 16 tokens (25% of 64) = 256 tokens over 256 / 16 + 64
    # (drain) = 80 steps; a step moves 552192 B of weights + 16 rows x 264 (mean live columns) x 512 B + 16 x 512 B
    # new K/V + 16 x 1000 x 4 B logits = 2787072 B in 9.290 us (FLOPs 6.6M, 0.22 us: bandwidth-bound), at 50% ->
    # 18.58 us, + 2 blocks x 200 us of launches
    assert p["step_bytes"]["total"] == 552192 + 16 * 264 * 512 + 16 * 512 + 64000 == 2787072
    assert p["decode"] == pytest.approx(80 * (2787072 / 300e9 / 0.5 + 400e-6), rel=1e-9)
    # update: 4 prompts x (256 + 4 x 16) = 1280 tokens x (6 x 138048 + 6 x 2 x 64 x 272) FLOPs / (40% of 60.5e12)
    assert p["update"] == pytest.approx(1280 * 1037184 / 24.2e12, rel=1e-6)
    # 2 updates x ring all-reduce of 552192 B (2 x 1/2 of it over 32 GB/s)
    assert p["comm"] == pytest.approx(2 * 552192 / 32e9, rel=1e-6)

    q = plan.plan(cfg(tiny, dtype="bfloat16", grad_ckpt=True, compile=True))
    # bf16 block: 4 x 262 + 10 x 64 + 2 x 704 = 3096 B a token; checkpointing keeps 2 block inputs (256 B each) + 1 block
    assert q["upd"]["acts"] == 1000 * (2 * 256 + 3096)
    # bf16 sampling: a bf16 weight copy (kept through the update), a bf16 cache (256 B a token), compiled compaction
    # into a power of two (x 1.5), a CUDA-graph pool the size of the sampler's (R, V) tensors; autocast's casts only
    # in the update
    assert q["roll"]["copy"] == q["upd"]["copy"] == 2 * 138048 and q["upd"]["casts"] == 2 * 138048
    assert "casts" not in q["roll"] and q["roll"]["kv"] == 16 * 320 * 256 * 1.5
    assert q["roll"]["pool"] == q["roll"]["sampler"] == 4 * 16 * 1000 * 4
    assert q["step_bytes"]["weights"] == 2 * 138048 and q["step_bytes"]["kv_read"] == 16 * 264 * 256

    f = plan.plan(cfg(tiny, fsdp=True))  # 2 GPUs: weights, AdamW and grads halved; the sampler gathers all weights
    assert f["upd"]["weights"] == f["upd"]["grads"] == 552192 / 2 and f["upd"]["adamw"] == 1104384 / 2
    assert f["roll"]["gather"] == 552192 and "gather" not in f["upd"] and p["roll"]["gather"] == 0

    # --sample_mem_gib: a budget of 12 rows' cache (12 x 320 x 512 B): 12 slots refilled from the queue of 16 rows
    c = plan.plan(cfg(tiny, sample_mem_gib=(12 * 320 * 512 + 1) / 2 ** 30))
    assert c["slots"] == 12 and c["roll"]["kv"] == 12 * 320 * 512 * 1.75 and c["roll"]["sampler"] == 4 * 12 * 1000 * 4
    step = 552192 + 12 * 264 * 512 + 12 * 512 + 12 * 4000
    assert c["decode"] == pytest.approx((256 / 12 + 64) * (step / 300e9 / 0.5 + 400e-6), rel=1e-9)


def test_plan_lines_match_real_tensors(tiny):
    """The formulas against what torch really allocates: parameters, the sampler's KVCache, autograd's saved tensors."""
    p = plan.plan(cfg(tiny, compile=True))
    m = plan.model_config(tiny)
    assert Transformer(m).num_params() == p["N"]
    cache = KVCache(m, p["slots"], p["S"], "cpu", torch.float32)
    assert (cache.k.nbytes + cache.v.nbytes) * 1.5 == p["roll"]["kv"]  # + compaction's copy, at most half
    for dtype in ("float32", "bfloat16"):
        per_block = []
        for n_layers in (1, 2):  # the difference is one block, without the final norm and the shared RoPE tables
            torch.manual_seed(0)
            model = Transformer(replace(m, n_layers=n_layers))
            saved, params = {}, {q.untyped_storage().data_ptr() for q in model.parameters()}

            def pack(t):  # (out, in) weight copies are autocast's casts (the plan's "casts" line), not activations
                if not (t.dim() == 2 and t.size(0) != 120):
                    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"), \
                    torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(torch.randint(0, 1000, (3, 40)), hidden=True)  # 120 tokens
            per_block.append(sum(v for k, v in saved.items() if k not in params))
        q = plan.plan(cfg(tiny, dtype=dtype))
        assert (per_block[1] - per_block[0]) / 120 == q["upd"]["acts"] / q["micro"] / 2, dtype


def test_dry_run_fits_refuses_and_errors(tiny):
    run = lambda *a: subprocess.run([sys.executable, "train.py", "--dry_run", f"--model={tiny}", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    ok = run("--gpu=l4", "--gpus=2")
    assert ok.returncode == 0 and "fits" in ok.stdout and "step time, estimated" in ok.stdout, ok.stderr
    big = run("--gpu=l4", "--prompts_per_step=65536", "--prompts_per_update=65536", "--k=16", "--max_new_tokens=4096")
    err = big.stderr.strip().splitlines()
    assert big.returncode == 2 and len(err) == 1 and "sampler KV cache" in err[0] and "GiB" in err[0], big.stderr
    bad = run("--gpu=tpu")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: --gpu=tpu: unknown GPU kind; expected one of h100, h200, a100-80g, a100-40g, l4"]
    nodry = subprocess.run([sys.executable, "train.py", "--gpus=8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert nodry.returncode == 2 and "torchrun" in nodry.stderr and len(nodry.stderr.strip().splitlines()) == 1


def test_model_config_sources(tiny):
    assert plan.model_config("Qwen/Qwen2.5-Math-1.5B").n_kv_heads == 2  # the built-in table (unless in the HF cache)
    assert plan.model_config(tiny).dim == 64  # a local config.json
    with pytest.raises(ValueError, match="no config.json"):
        plan.model_config("nobody/no-such-model-xyz")


def test_mismatch_row(tiny_dir):
    """bench's mismatch row: 0 when the sampler runs in fp32 (same numbers as the trainer), > 0 with bf16 weights."""
    model, tok = from_pretrained(tiny_dir("qwen2"))
    prompts, stops = [chat_ids(tok, t) for t in ("1+1", "2+3")], stop_token_ids(tok, model.cfg)
    zero = bench.mismatch(model, prompts, 6, stops, dtype=torch.float32)
    assert max(zero.values()) < 1e-5, zero
    m = bench.mismatch(model, prompts, 6, stops)
    assert m["mismatch_max"] >= m["mismatch_mean"] > 1e-4 and m["mismatch_k3"] > 0, m
    assert next(model.parameters()).dtype == torch.float32  # the trainer's weights are left as they were


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_bench_gpu_refused_on_cpu():
    p = subprocess.run([sys.executable, "bench.py", "--gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --gpu is the GPU bring-up and needs a CUDA device; torch.cuda.is_available() is False here"]


def test_rows_survive_failing_peers(tmp_path, capsys):
    """A peer that raises, exits, crashes in its subprocess, cannot import or times out costs only its row: every row
    is printed and in the JSON as soon as it is measured, failed ones with one line why."""
    out = bench.Rows(str(tmp_path / "b.json"), versions=bench.versions())
    py = lambda code: [sys.executable, "-c", code]
    good = lambda: dict(x=1.0)

    def exits():
        sys.exit("bad")
    peers = [("good", good), ("raises", lambda: 1 / 0), ("exits", exits),
             ("crashes", lambda: bench.run_peer(py("import sys; print('x', file=sys.stderr); sys.exit(3)"), 60, "p")),
             ("no module", lambda: bench.run_peer(py("import no_such_module_xyz"), 60, "p")),
             ("hangs", lambda: bench.run_peer(py("import time; time.sleep(60)"), 1, "p")), ("good2", good)]
    for name, fn in peers:
        out.run("t", name, fn, lambda r: f"  {name} {r['x']}")
        assert len(json.load(open(tmp_path / "b.json"))["rows"]) == peers.index((name, fn)) + 1  # written at once
    doc = json.load(open(tmp_path / "b.json"))
    assert doc["versions"]["torch"] == torch.__version__ and {"transformers", "trl"} <= set(doc["versions"])
    err = {r["name"]: r.get("error") for r in doc["rows"]}
    assert err == {"good": None, "raises": "ZeroDivisionError: division by zero", "exits": "exit bad",
                   "crashes": "p exited 3: x", "no module": "p exited 1: ModuleNotFoundError: No module named "
                   "'no_such_module_xyz'", "hangs": "p timed out after 1 s", "good2": None}
    assert doc["rows"][-1]["x"] == 1.0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(peers) and lines[0] == "  good 1.0" and lines[-1] == "  good2 1.0"
    assert all("failed: " in ln and "\n" not in ln for ln in lines[1:-1])


def test_main_survives_failing_peers(tiny_dir, tmp_path, monkeypatch, capsys):
    """bench.main with fake peers (a tiny model; ours' RL step fine, no-skip exits, TRL's worker crashes; bf16 sampler
    raises): every other row, the accounting table and the summary table still come out, and the JSON has them all."""
    from model import from_pretrained as load
    monkeypatch.setattr(bench, "from_pretrained", lambda device=None: load(tiny_dir("qwen2")))
    monkeypatch.setattr(bench, "matmul_peak", lambda dt: 1e11 if dt == torch.float32 else 2e11)  # "fast bf16"
    monkeypatch.setattr(bench, "bench_sampler", lambda m, h, tok, ps, n, reps, mode: (
        (10.0, 5.0) if next(m.parameters()).dtype == torch.float32 else 1 / 0))
    ours = dict(gen=1.0, update=2.0, tokens=100.0, seq=50.0, zero_var=0.5, mem=1e9)
    monkeypatch.setattr(bench, "run_ours", lambda work, steps, pl, head, threads, extra, timeout: dict(ours) if
                        "--kl_coef=1e-9" not in extra else sys.exit(1))
    monkeypatch.setattr(bench, "run_trl", lambda *a: bench.run_peer(
        [sys.executable, "-c", "raise ValueError('TRL refuses')"], 60, "TRL worker"))
    path = tmp_path / "b.json"
    bench.main(["--quick", f"--json={path}"])
    printed = capsys.readouterr().out
    rows = {r["name"]: r for r in json.load(open(path))["rows"]}
    assert rows["ours fp32"]["gen"] == 1.0 and rows["ours bf16"]["update"] == 2.0 and rows["fp32"]["ours"] == 10.0
    assert rows["ours no-skip* fp32"]["error"] == "exit 1" and rows["bf16"]["error"].startswith("ZeroDivisionError")
    trl = [r for n, r in rows.items() if n.startswith("TRL")]
    assert len(trl) == 2 and all(r["error"] == "TRL worker exited 1: ValueError: TRL refuses" for r in trl)
    assert rows["256 rows, blocks"]["ratio"] <= 1.3 and "mismatch_max" in rows["bf16 vs fp32"]
    has_stats = "stats" in __import__("inspect").signature(bench.generate).parameters
    cpu_run = rows["CPU run"]
    assert ("error" not in cpu_run) if has_stats else cpu_run["error"].startswith("n/a (sampler without stats)")
    assert "| RL step, 8 prompts x 8 x <= 48 tokens, fp32 (gen + update) | 3.00 s (1.00 + 2.00)" in printed
    assert "failed: TRL worker exited 1: ValueError: TRL refuses" in printed and "Traceback" not in printed


def test_trl_config_bf16(tmp_path):
    """TRL's bf16 GRPOConfig is accepted on this device (transformers >= 5.25 refuses bf16 on a CPU without use_cpu,
    which killed the whole bench run). Skips without TRL, a benchmark-only dependency."""
    pytest.importorskip("trl")
    args = bench.trl_config(str(tmp_path), 8, 8, 48, True, [2], 3)
    assert args.bf16 and args.num_generations == 8 and args.max_steps == 4
