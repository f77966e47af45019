"""
nanoGRPO against its peers on identical work, side by side in one run (issue 6). Notes and results: dev/perf.md.

    python bench.py               # all rows: sampler fp32 + bf16, RL step ours vs TRL, MFU, peak memory
    python bench.py --quick       # smoke test: smaller sampler work, 1 timed RL step
    python bench.py --skip-trl    # no TRL row (TRL is a benchmark-only dependency: pip install trl)
    python bench.py --steps=5     # timed RL steps per trainer, after one untimed warm-up step (default 3)
    python bench.py --threads=1   # torch CPU threads everywhere (default torch's); 1 on a busy box: 2 threads on 2
                                  # shared cores can run 10x slower (oversubscribed OpenMP), which measures noise
    python bench.py --gpu         # GPU bring-up, ~10 min on one H100: the CUDA tests (named *_cuda), the sampler at
                                  # 256 rows and the RL step vs TRL, fp32 and bf16, the bf16 mismatch; prints one
                                  # markdown table for the README. TRL rows need: pip install trl==1.16.0

Rows (same weights everywhere: the embedded SmolLM2-135M-Instruct, exported once to a temp HF dir for transformers):
  sampler   tokens/s of rollout.generate vs transformers' model.generate on 32 prompts x 2 samples x 64 new tokens,
            plain T=1 sampling over the full vocab, left padding, same stop ids; tokens = generated tokens up to and
            including the stop token (or 64), counted the same way for both; fp32, then both models cast to bf16
            (without fast bf16: bf16 and fp32 on 2 prompts x 8 tokens, and rollout.Bf16Emulation at full size)
  mismatch  the same rollouts' log-probs from the sampler with bf16 weights vs the trainer's fp32 forward
            (loss.sampler_mismatch: mean / max |d logp|, k3 KL); on a CPU without fast bf16, on 2 prompts x 8 tokens
  RL step   seconds per step, split into gen (sampling + rewards [+ ref log-probs]) and update (forward, backward,
            AdamW): 8 synthetic:1 prompts x k=8, <= 48 new tokens, T=1, no KL, one update per batch, lr 1e-6, same
            reward (math_reward, fallbacks boxed,last_number, truncated = 0). Ours runs train.py in a subprocess and
            parses its log; TRL runs GRPOTrainer in a subprocess with its generation method wrapped in a timer
  MFU       update FLOP/s (6 * params * trained tokens + causal attention) / the matmul peak measured here (fp32)
  mem       peak RSS of the trainer's process (CPU) or torch.cuda.max_memory_allocated (CUDA)
"""
import copy
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from data import load_problems
from loss import sampler_mismatch
from model import chat_ids, from_pretrained, save_pretrained, stop_token_ids
from reward import math_reward
from rollout import Bf16Emulation, completion_logprobs, generate, shared_prefix_len

ROOT = os.path.dirname(os.path.abspath(__file__))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
torch.backends.cuda.matmul.allow_tf32 = True  # as train.py: "fp32" peak and training alike use TF32 on CUDA
FALLBACKS = ("boxed", "last_number")
WORK = dict(cpu=(8, 8, 48), gpu=(32, 8, 256))  # the RL step's prompts, k, max new tokens


def peak_mem():
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_name():
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def matmul_peak(dtype, seconds=1.0):
    n = 8192 if device.type == "cuda" else 2048
    if device.type == "cpu":  # probe small first: without native bf16 (AVX2-only CPUs) 2048^3 takes minutes
        a = torch.randn(256, 256, dtype=dtype)
        a @ a
        t0 = time.time()
        a @ a
        if 2 * 256 ** 3 / (time.time() - t0) < 5e9:
            return 2 * 256 ** 3 / (time.time() - t0)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool / cuBLAS handles
    sync()
    it, t0 = 0, time.time()
    while it < 3 or time.time() - t0 < seconds:
        a @ b
        it += 1
        sync()
    return 2 * n ** 3 * it / (time.time() - t0)

# -----------------------------------------------------------------------------
# 1. sampler: ours vs transformers' generate


def bench_sampler(model, hf, tok, prompts, new, reps, mode=nullcontext):
    stops = stop_token_ids(tok, model.cfg)
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[stops[0]] * (L - len(p)) + p for p in prompts], device=device)  # left padding
    am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    stop_t = torch.tensor(stops, device=device)

    def ours(n):
        ro = generate(model, prompts, k=2, max_new_tokens=n, temperature=1.0, stop_ids=stops, pad_id=stops[0], seed=0)
        return int(ro.mask.sum())

    def theirs(n):
        out = hf.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          num_return_sequences=2, max_new_tokens=n, eos_token_id=stops, pad_token_id=stops[0])
        gen = out[:, L:]
        hit = torch.isin(gen, stop_t)
        return int(torch.where(hit.any(1), hit.int().argmax(1) + 1, gen.size(1)).sum())  # up to and incl. the stop

    res = []
    for fn in (ours, theirs):
        torch.manual_seed(0)
        best = 0.0
        with mode():  # Bf16Emulation: both samplers' matmuls rounded to bf16
            fn(4)  # warm-up
            for _ in range(reps):  # best of reps: the machine is shared, the max is the least disturbed run
                sync()
                t0 = time.time()
                n = fn(new)
                sync()
                best = max(best, n / (time.time() - t0))
        res.append(best)
    return res


def mismatch(model, prompts, new, stops, dtype=torch.bfloat16):
    """Sample with a copy of the weights in `dtype`, score the same rollouts with the fp32 model as the trainer does
    -> loss.sampler_mismatch's numbers as floats (all 0 when dtype is fp32: the sampler's and the trainer's layout
    are the same computation)."""
    ro = generate(copy.deepcopy(model).to(dtype), prompts, k=2, max_new_tokens=new, temperature=1.0, stop_ids=stops,
                  pad_id=stops[0], seed=0)
    with torch.no_grad():
        logp = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, 1.0)
    return {k: float(v) for k, v in sampler_mismatch(ro.logp, logp, ro.mask).items()}

# -----------------------------------------------------------------------------
# 2. RL step: ours (train.py in a subprocess) and TRL's GRPOTrainer (bench.py --trl-worker in a subprocess)

# runs train.py unchanged and reports the process's peak memory when it exits
WRAP = ("import atexit, resource, runpy, sys, torch; sys.argv = ['train.py'] + sys.argv[1:]; "
        "atexit.register(lambda: print('PEAKMEM', torch.cuda.max_memory_allocated() if torch.cuda.is_available() "
        "else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, flush=True)); "
        "runpy.run_path('train.py', run_name='__main__')")
LINE = re.compile(r"step (\d+)/\d+ .*?zero_var ([\d.]+) .*?len ([\d.]+) .*?roll ([\d.]+)s \| train ([\d.]+)s")


def run_ours(work, steps, prompt_len, head, threads, extra=(), timeout=None):
    P, K, new = work
    with tempfile.TemporaryDirectory() as out:
        args = [f"--prompts_per_step={P}", f"--prompts_per_update={P}", f"--k={K}", f"--max_new_tokens={new}",
                f"--num_steps={steps + 1}", "--eval_every=0", "--eval_n=1", "--lr=1e-6", "--sample_every=0",
                "--temperature=1.0", "--data=synthetic:1", f"--out_dir={out}", f"--threads={threads}", *extra]
        try:
            p = subprocess.run([sys.executable, "-c", WRAP, *args], cwd=ROOT, capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"train.py {' '.join(extra)} timed out after {timeout} s: no row")
            return None
    if p.returncode:
        sys.exit(f"train.py failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    rows = [tuple(map(float, m.groups())) for m in LINE.finditer(p.stdout)][1:]  # drop the warm-up step
    mean = lambda i: sum(r[i] for r in rows) / len(rows)
    # tokens the update forwards ~ kept groups x (prompt past the shared head + k mean completions) + the head once
    # (completion_logprobs computes each prompt once per group and the chat template's head once): the log has no
    # exact count
    trained = (1 - mean(1)) * P * (prompt_len - head + K * mean(2)) + head
    return dict(gen=mean(3), update=mean(4), tokens=trained, seq=prompt_len + mean(2), zero_var=mean(1),
                mem=float(re.search(r"PEAKMEM (\d+)", p.stdout).group(1)))


def trl_worker(hf_dir, steps, threads, P, K, new, bf16):
    """GRPOTrainer on the same work; prints one RESULT json line."""
    if threads:
        torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    stops = stop_token_ids(tok)
    probs = load_problems("synthetic:1", "train")[:P * (steps + 1)]
    ds = Dataset.from_list([dict(prompt=[{"role": "user", "content": p["prompt"]}], answer=p["answer"]) for p in probs])

    def reward(completions, answer, completion_ids, **kw):  # truncated (no stop within `new` tokens) scores 0, as ours
        return [math_reward(c[0]["content"], a, FALLBACKS, truncated=len(ids) >= new and ids[-1] not in stops)
                for c, a, ids in zip(completions, answer, completion_ids)]

    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, num_generations=K, per_device_train_batch_size=P * K,
                          gradient_accumulation_steps=1, max_completion_length=new, temperature=1.0, top_k=0,
                          top_p=1.0, beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", num_iterations=1,
                          loss_type="grpo", epsilon=0.2, epsilon_high=0.28, use_vllm=False, logging_steps=1,
                          report_to=[], bf16=bf16, max_steps=steps + 1, save_strategy="no", seed=0,
                          gradient_checkpointing=False,  # TRL's default is True; ours (grad_ckpt) is off
                          tf32=True if device.type == "cuda" else None,  # as train.py
                          generation_kwargs=dict(eos_token_id=stops))
        trainer = GRPOTrainer(model=hf_dir, reward_funcs=reward, args=args, train_dataset=ds)
        gen, step, toks = [], [], []
        orig = trainer._generate_and_score_completions

        def timed(*a, **kw):  # generation + rewards + advantages, the same span as our "roll"
            t0 = time.time()
            out = orig(*a, **kw)
            sync()
            gen.append(time.time() - t0)
            toks.append(float(out["prompt_mask"].sum() + out["completion_mask"].sum()))  # trains on every row
            return out
        trainer._generate_and_score_completions = timed

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **kw):
                self.t0 = time.time()

            def on_step_end(self, *a, **kw):
                sync()
                step.append(time.time() - self.t0)
        trainer.add_callback(StepTimer())
        trainer.train()
    g, s = gen[1:], step[1:]  # drop the warm-up step
    mean = lambda xs: sum(xs) / len(xs)
    print("RESULT " + json.dumps(dict(gen=mean(g), update=mean(s) - mean(g), tokens=mean(toks[1:]),
                                      seq=mean(toks[1:]) / (P * K), mem=peak_mem())), flush=True)


def run_trl(hf_dir, steps, threads, work, bf16=False, timeout=None):
    try:
        import trl
    except ImportError:
        print("TRL not installed: pip install trl==1.16.0 (benchmark-only dependency); skipping the TRL row")
        return None, None
    try:
        p = subprocess.run([sys.executable, __file__, "--trl-worker", hf_dir,
                            *map(str, (steps, threads, *work, int(bf16)))], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"TRL timed out after {timeout} s: no row")
        return None, trl.__version__
    m = re.search(r"RESULT (.*)", p.stdout)
    if not m:
        sys.exit(f"TRL worker failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(m.group(1)), trl.__version__

# -----------------------------------------------------------------------------


def cuda_tests(timeout):
    """The GPU-only tests (named *_cuda, skipped elsewhere) -> pytest's summary line; failures are printed."""
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests", "-k", "cuda"], cwd=ROOT, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if p.returncode not in (0, 5):  # 5: nothing collected
        print(p.stdout[-4000:])
    return (p.stdout.strip().splitlines() or [f"pytest exit {p.returncode}"])[-1]


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    flags = ("--quick", "--skip-trl", "--gpu")
    bad = [a for a in argv if a not in flags and not a.startswith(("--steps=", "--threads="))]
    if bad:  # a typo must not silently start a 12-minute run with the defaults
        print(f"error: unknown argument {bad[0]!r}; use --quick, --skip-trl, --gpu, --steps=N, --threads=N",
              file=sys.stderr)
        sys.exit(2)
    quick, skip_trl, gpu = (f in argv for f in flags)
    if gpu and (device.type != "cuda" or quick):
        print("error: --gpu runs fixed sizes, drop --quick" if quick and device.type == "cuda" else
              "error: --gpu is the GPU bring-up and needs a CUDA device; torch.cuda.is_available() is False here",
              file=sys.stderr)
        sys.exit(2)
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--steps=")), 1 if quick else 2 if gpu else 3)
    threads = next((int(a.split("=")[1]) for a in argv if a.startswith("--threads=")), 0)
    if threads:
        torch.set_num_threads(threads)
    tests = cuda_tests(timeout=180) if gpu else None  # first: a broken CUDA path shows before minutes of timing
    n_prompts, new, reps = (8, 16, 1) if quick else (128, 256, 2) if gpu else (32, 64, 2)
    work = WORK["gpu" if gpu else "cpu"]
    timeout = 120 if gpu else None  # per train.py / TRL run: the whole --gpu run must fit a lent GPU's ~10 minutes
    import transformers
    from transformers import AutoModelForCausalLM
    model, tok = from_pretrained(device=device)
    n_params, cfg = model.num_params(), model.cfg
    stops = stop_token_ids(tok, cfg)
    probs = load_problems("synthetic:1", "train")
    prompts = [chat_ids(tok, p["prompt"]) for p in probs[:n_prompts]]
    sample = [chat_ids(tok, p["prompt"]) for p in probs[:64]]
    prompt_len = sum(len(p) for p in sample) / len(sample)
    head = shared_prefix_len(sample)  # the chat template's common head
    peak = {dt: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    fast_bf16 = peak[torch.bfloat16] > peak[torch.float32]  # CPUs without native bf16 (AVX2 only) run it ~100x slower
    hf_dir = tempfile.mkdtemp(prefix="bench_hf_")
    save_pretrained(model, tok, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}"
    print(f"machine: {device} ({torch.get_num_threads()} threads; {where}), torch {torch.__version__}, transformers "
          f"{transformers.__version__}, load avg {os.getloadavg()[0]:.1f} at start; SmolLM2-135M-Instruct, "
          f"{n_params / 1e6:.1f}M params")
    print(f"matmul peak ({8192 if device.type == 'cuda' else 2048}^3): fp32 {peak[torch.float32] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    # mismatch first, while the weights are still exactly fp32 (the sampler rows cast them to bf16 and back)
    mis_p, mis_new = (prompts, new) if fast_bf16 else (prompts[:2], 8)
    mis = mismatch(model, mis_p, mis_new, stops)
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bf16 else [])
    samp = {"fp32": bench_sampler(model, hf, tok, prompts, new, reps)}
    if fast_bf16:
        samp["bf16"] = bench_sampler(model.bfloat16(), hf.bfloat16(), tok, prompts, new, reps)
    else:  # real bf16 on a small batch only, and the emulation (rollout.Bf16Emulation) at full size
        print("bf16 matmul is slower than fp32 on this machine: no bf16 RL-step row; bf16 sampling measured on "
              "2 prompts x 8 tokens, and emulated (bf16 rounding at fp32 speed) at full size")
        samp["bf16 emul"] = bench_sampler(model, hf, tok, prompts, new, reps, Bf16Emulation)
        samp["fp32 2x8"] = bench_sampler(model, hf, tok, prompts[:2], 8, 1)
        samp["bf16 2x8"] = bench_sampler(model.bfloat16(), hf.bfloat16(), tok, prompts[:2], 8, 1)
    del model, hf
    print(f"\nsampler: {n_prompts} prompts x 2 samples x {new} new tokens, T=1; tok/s = generated tokens up to and "
          f"including the stop, best of {reps}")
    print(f"  {'dtype':9s} {'ours tok/s':>11s} {'HF tok/s':>9s}")
    for name, (o, h) in samp.items():
        print(f"  {name:9s} {o:11.1f} {h:9.1f}")
    mis_txt = (f"mean abs d logp {mis['mismatch_mean']:.2e}, max {mis['mismatch_max']:.2e}, k3 KL "
               f"{mis['mismatch_k3']:.2e}")
    print(f"mismatch, sampler with bf16 weights vs the trainer's fp32 forward, same rollouts ({len(mis_p)} prompts x 2 "
          f"x {mis_new} tokens{'' if fast_bf16 else ': a small batch, bf16 is slow here'}): {mis_txt}")

    rl = []  # (trainer, dtype, result)
    for name, dt in dtypes:
        extra = [] if name == "fp32" else ["--dtype=bfloat16"]
        rl.append(("ours", name, run_ours(work, steps, prompt_len, head, threads, extra, timeout)))
        if not gpu and name == "fp32":
            rl.append(("ours no-skip*", name, run_ours(work, steps, prompt_len, head, threads, ["--kl_coef=1e-9"])))
        if not skip_trl:
            r, trl_ver = run_trl(hf_dir, steps, threads, work, name == "bf16", timeout)
            rl.append((f"TRL {trl_ver}", name, r))
    rl = [x for x in rl if x[2]]  # a timed-out or skipped run has no row
    shutil.rmtree(hf_dir, ignore_errors=True)
    print(f"\nRL step: {work[0]} prompts x k={work[1]}, <= {work[2]} new tokens, T=1, beta 0, 1 update; "
          f"mean of {steps} step(s) after 1 warm-up{'; --skip-trl: no TRL row' if skip_trl else ''}")
    print(f"  {'trainer':14s} {'dtype':5s} {'gen s':>6s} {'update s':>8s} {'step s':>7s} {'trained tok':>11s} "
          f"{'upd GFLOP/s':>11s} {'MFU':>6s} {'peak mem':>9s}")
    for name, dt, r in rl:
        flops = r["tokens"] * (6 * n_params + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * r["seq"])
        r["fs"] = flops / max(r["update"], 1e-9)
        r["mfu"] = r["fs"] / peak[dict(dtypes)[dt]]
        print(f"  {name:14s} {dt:5s} {r['gen']:6.2f} {r['update']:8.2f} {r['gen'] + r['update']:7.2f} "
              f"{r['tokens']:11.0f} {r['fs'] / 1e9:11.1f} {r['mfu']:6.1%} {r['mem'] / 2**30:7.2f}GB")
    if not gpu:
        print(f"  * ours drops zero-variance groups before the forward (zero_var {rl[0][2]['zero_var']:.2f} of groups "
              f"this run); TRL trains on every row. 'no-skip' keeps them (--kl_coef=1e-9), which also loads a frozen "
              f"reference and adds its log-prob forward to gen. Ours forwards each prompt once per group and the "
              f"common chat-template head ({head} tokens) once; its trained tokens are estimated from its log (kept "
              f"groups x (prompt - head + k x mean completion) + head). TRL forwards every row's prompt; its tokens "
              f"are counted. MFU is against the measured matmul peak of the row's dtype")

    # one markdown table, ready for the README's Speed section
    trl = {dt: r for name, dt, r in rl if name.startswith("TRL")}
    step = lambda r: f"{r['gen'] + r['update']:.2f} s ({r['gen']:.2f} + {r['update']:.2f})"
    print(f"\n| work ({where}, SmolLM2-135M-Instruct) | ours | peer | ratio |\n|---|---|---|---|")
    for name, (o, h) in samp.items():
        work_txt = "2 prompts x 2 x 8 tokens" if "2x8" in name else f"{n_prompts} prompts x 2 x {new} tokens"
        print(f"| sampler, {work_txt}, T=1, {name.split()[0]}{' emulated' if 'emul' in name else ''} | {o:.1f} tok/s "
              f"| `generate` {h:.1f} tok/s | {o / h:.2f}x |")
    print(f"| sampler bf16 vs trainer fp32 log-probs, same rollouts ({len(mis_p)} x 2 x {mis_new}) | {mis_txt} | | |")
    for name, dt, r in rl:
        if name == "ours":
            t = trl.get(dt)
            peer = f"TRL {step(t)}, MFU {t['mfu']:.1%}, {t['mem'] / 2**30:.1f} GB" if t else "no TRL row"
            ratio = f"{(t['gen'] + t['update']) / (r['gen'] + r['update']):.2f}x" if t else ""
            print(f"| RL step, {work[0]} prompts x {work[1]} x <= {work[2]} tokens, {dt} (gen + update) | {step(r)}, "
                  f"MFU {r['mfu']:.1%}, {r['mem'] / 2**30:.1f} GB | {peer} | {ratio} |")
    if tests:
        print(f"| CUDA tests, `pytest -q tests -k cuda` | {tests} | | |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl-worker"]:
        trl_worker(sys.argv[2], *map(int, sys.argv[3:8]), bool(int(sys.argv[8])))
    else:
        main(sys.argv[1:])
