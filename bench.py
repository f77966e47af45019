"""
nanoGRPO against its peers on identical work, side by side in one run (issue 6). Notes and results: dev/perf.md.

    python bench.py               # all rows: sampler fp32 + bf16, RL step ours vs TRL, MFU, peak memory
    python bench.py --quick       # smoke test: smaller sampler work, 1 timed RL step
    python bench.py --skip-trl    # no TRL row (TRL is a benchmark-only dependency: pip install trl)
    python bench.py --steps=5     # timed RL steps per trainer, after one untimed warm-up step (default 3)
    python bench.py --threads=1   # torch CPU threads everywhere (default torch's); 1 on a busy box: 2 threads on 2
                                  # shared cores can run 10x slower (oversubscribed OpenMP), which measures noise
    python bench.py --json=PATH   # where the rows go as they are measured (default out/bench.json)
    python bench.py --gpu         # GPU bring-up, ~10 min on one H100: the CUDA tests (named *_cuda), the sampler at
                                  # 256 rows and the RL step vs TRL, fp32 and bf16, the bf16 mismatch; prints one
                                  # markdown table for the README. TRL rows need: pip install trl==1.16.0

Each row is printed and written to the JSON (with the versions of torch, transformers and TRL) as soon as it is
measured; a peer that fails (TRL refusing, a crash, a timeout, an import error) costs only its row, printed as failed
with one line why.

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
  accounting  bytes a decode step moves for Qwen2.5-Math-1.5B in bf16 at 256 and 1024 rows (plan.decode_roofline:
            weights once + live KV cache + new K/V + fp32 logits) and the roofline tokens/s on H100 / H200, next to
            what a sampler design moves per generated token (plan.decode_moved on the counters `simulate` predicts),
            and, when rollout.generate takes stats=, the counters of a real CPU run
"""
import copy
import heapq
import inspect
import json
import os
import random
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
from plan import decode_moved, decode_roofline, live_cols, model_config, tokens_per_s
from reward import math_reward
from rollout import Bf16Emulation, completion_logprobs, generate, shared_prefix_len

ROOT = os.path.dirname(os.path.abspath(__file__))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
# rows: each printed and written to the JSON as soon as it is measured; a failed peer costs its row, not the run


class Rows:
    """The run's rows: printed at once and kept in a JSON file (rewritten whole, atomically, after every row)."""

    def __init__(self, path, **header):
        self.path, self.doc = path, dict(header, rows=[])
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.save()

    def save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(self.path + ".tmp", self.path)

    def add(self, table, name, line, **values):
        print(line, flush=True)
        self.doc["rows"].append(dict(table=table, name=name, **values))
        self.save()

    def run(self, table, name, fn, fmt):
        """fn() -> dict of numbers, printed as fmt(dict). Any failure inside it (an exception, sys.exit, a peer's
        timeout or crash) becomes one failed row with one line why; returns None then."""
        try:
            r = fn()
        except (Exception, SystemExit) as e:  # Ctrl-C still stops the run
            why = (f"exit {e.code}" if isinstance(e, SystemExit) else str(e) if type(e) is RuntimeError  # ours
                   else f"{type(e).__name__}: {e}")
            why = why.strip().splitlines()[0][:300] if why.strip() else type(e).__name__
            state = "" if why.startswith("n/a") else "failed: "  # n/a: nothing to measure here, not a failure
            self.add(table, name, f"  {name:14s} {state}{why}", error=why, log=getattr(e, "tail", None))
            return None
        self.add(table, name, fmt(r), **r)
        return r


def run_peer(cmd, timeout, what):
    """A peer's subprocess -> its stdout. A timeout or a nonzero exit raises RuntimeError with one line why (the last
    line of its stderr: the exception) and the output's tail (kept in the JSON)."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what} timed out after {timeout} s") from None
    if p.returncode:
        last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["no output"])[-1]
        e = RuntimeError(f"{what} exited {p.returncode}: {last}")
        e.tail = (p.stdout[-2000:] + "\n" + p.stderr[-3000:]).strip()
        raise e
    return p.stdout


def versions():
    """The versions the figures are measured with (TRL: None when not installed)."""
    import transformers
    try:
        import trl
        trl_v = trl.__version__
    except ImportError:
        trl_v = None
    return dict(python=sys.version.split()[0], torch=torch.__version__, transformers=transformers.__version__,
                trl=trl_v)

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
        out = run_peer([sys.executable, "-c", WRAP, *args], timeout, "train.py")
    rows = [tuple(map(float, m.groups())) for m in LINE.finditer(out)][1:]  # drop the warm-up step
    if not rows:
        raise RuntimeError(f"train.py printed no timed step line ({steps + 1} steps asked)")
    mean = lambda i: sum(r[i] for r in rows) / len(rows)
    # tokens the update forwards ~ kept groups x (prompt past the shared head + k mean completions) + the head once
    # (completion_logprobs computes each prompt once per group and the chat template's head once): the log has no
    # exact count
    trained = (1 - mean(1)) * P * (prompt_len - head + K * mean(2)) + head
    return dict(gen=mean(3), update=mean(4), tokens=trained, seq=prompt_len + mean(2), zero_var=mean(1),
                mem=float(re.search(r"PEAKMEM (\d+)", out).group(1)))


def trl_config(out, P, K, new, bf16, stops, steps):
    """TRL's GRPOConfig for the bench's work, set to match ours where TRL's defaults differ."""
    from trl import GRPOConfig
    return GRPOConfig(output_dir=out, num_generations=K, per_device_train_batch_size=P * K,
                      gradient_accumulation_steps=1, max_completion_length=new, temperature=1.0, top_k=0,
                      top_p=1.0, beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant", num_iterations=1,
                      loss_type="grpo", epsilon=0.2, epsilon_high=0.28, use_vllm=False, logging_steps=1,
                      report_to=[], bf16=bf16, max_steps=steps + 1, save_strategy="no", seed=0,
                      gradient_checkpointing=False,  # TRL's default is True; ours (grad_ckpt) is off
                      tf32=False if device.type == "cuda" else None,  # as train.py: fp32 is fp32
                      use_cpu=device.type == "cpu",  # transformers >= 5.25 refuses bf16 on a CPU without it
                      generation_kwargs=dict(eos_token_id=stops))


def trl_worker(hf_dir, steps, threads, P, K, new, bf16):
    """GRPOTrainer on the same work; prints one RESULT json line."""
    if threads:
        torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer
    tok = AutoTokenizer.from_pretrained(hf_dir)
    stops = stop_token_ids(tok)
    probs = load_problems("synthetic:1", "train")[:P * (steps + 1)]
    ds = Dataset.from_list([dict(prompt=[{"role": "user", "content": p["prompt"]}], answer=p["answer"]) for p in probs])

    def reward(completions, answer, completion_ids, **kw):  # truncated (no stop within `new` tokens) scores 0, as ours
        return [math_reward(c[0]["content"], a, FALLBACKS, truncated=len(ids) >= new and ids[-1] not in stops)
                for c, a, ids in zip(completions, answer, completion_ids)]

    with tempfile.TemporaryDirectory() as out:
        args = trl_config(out, P, K, new, bf16, stops, steps)
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
    """TRL's GRPOTrainer on the same work, in a subprocess (bench.py --trl-worker) -> its result dict."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise RuntimeError("TRL not installed: pip install trl==1.16.0 (benchmark-only dependency)") from None
    out = run_peer([sys.executable, __file__, "--trl-worker", hf_dir, *map(str, (steps, threads, *work, int(bf16)))],
                   timeout, "TRL worker")
    m = re.search(r"RESULT (.*)", out)
    if not m:
        raise RuntimeError("TRL worker printed no RESULT line")
    return json.loads(m.group(1))

# -----------------------------------------------------------------------------
# 3. accounting: bytes a decode step moves, against the roofline (plan.py's functions; the GPU check uses them too)

QWEN = "Qwen/Qwen2.5-Math-1.5B"


def paper_lens(n, max_new=3072, mean=0.25, trunc=0.1, seed=0):
    """n completion lengths like the paper's (mean `mean` x max_new, `trunc` of them truncated at max_new): the rest
    on an even grid over 1..top, top set by the mean; in a fixed shuffled order, as a queue would see them."""
    n_t = round(n * trunc)
    top = 2 * (mean * max_new * n - n_t * max_new) / (n - n_t)
    lens = [max_new] * n_t + [max(1, round(top * (i + 0.5) / (n - n_t))) for i in range(n - n_t)]
    random.Random(seed).shuffle(lens)
    return lens


def simulate(lens, prompt, R, width="row", block=128, sync=16):
    """The counters generate(..., stats=dict) would report for a continuously batched decode (an analytic model, not
    a run): R slots; row r (in queue order) takes the first free slot, its first token comes from the prefill and its
    lens[r] - 1 others from decode steps; a slot is freed at the next host check (every `sync` steps); once the queue
    is empty, live rows are compacted into the next power of two. width "row": each row's attention reads its own
    live columns rounded up to `block` (a block-sparse kernel: FlexAttention); an int: every slot reads that many
    columns (a static-width compiled decode). -> dict(steps, row_steps, tokens, key_cols, graphs)."""
    free, spans = [(0, s) for s in range(R)], []
    for c in lens:
        t0, s = heapq.heappop(free)
        spans.append((t0, t0 + c - 1))  # decode steps [t0, t0 + c - 1) feed this row
        heapq.heappush(free, (-(-(t0 + c - 1) // sync) * sync, s))
    T, q = max(e for _, e in spans), max(t0 for t0, _ in spans)  # steps; the step the queue empties
    live = [0] * (T + 1)
    for t0, e in spans:
        live[t0] += 1
        live[e] -= 1
    bucket = lambda x: min(R, 1 << max(x - 1, 0).bit_length())
    row_steps, n, sizes = 0, 0, {R}
    for t in range(T):
        n += live[t]
        row_steps += R if t < q else bucket(n)
        sizes.add(R if t < q else bucket(n))
    if width == "row":  # row with c tokens reads prompt + 1 .. prompt + c - 1 columns, each rounded up to a block
        f = lambda x: block * block * (x // block) * (x // block + 1) // 2 + (x % block) * (x // block + 1) * block
        key_cols = sum(f(prompt + c - 1) - f(prompt) for c in lens)  # f(x) = sum of ceil(j / block) * block, j <= x
    else:
        key_cols = row_steps * width
    return dict(steps=T, row_steps=row_steps, tokens=sum(lens), key_cols=key_cols, graphs=len(sizes))


def accounting_rows(rows_list=(256, 1024), queue=2048, prompt=250, max_new=3072):
    """The accounting table's rows for Qwen2.5-Math-1.5B in bf16 (weights and cache; fp32 logits): the roofline and
    two sampler designs' predicted bytes per generated token, from `simulate` on paper-like lengths."""
    m, lens = model_config(QWEN), paper_lens(queue, max_new)
    cols = live_cols([prompt] * queue, lens)
    S = -(-(prompt + max_new) // 256) * 256  # a static-width cache: prompt + max_new rounded up to 256
    out = []
    for R in rows_list:
        roof = decode_roofline(m, R, cols)
        row = dict(rows=R, live_cols=cols, roofline_step=roof["total"], roofline_token=roof["total"] / R,
                   h100=tokens_per_s(roof["total"] / R, "h100"), h200=tokens_per_s(roof["total"] / R, "h200"))
        for name, width in (("blocks", "row"), ("static", S)):
            st = simulate(lens, prompt, R, width)
            mv = decode_moved(m, st)
            row[name] = dict(stats=st, token=mv["per_token"], util=mv["util"],
                             ratio=mv["per_token"] / row["roofline_token"])
        out.append(row)
    return out, S


def measured_stats(model, prompts, new, stops):
    """A real CPU run of rollout.generate with stats= (the sampler's counters) -> the accounting of what it moved
    (fp32 weights and cache) against the roofline of the same rollouts. RuntimeError if generate has no stats."""
    if "stats" not in inspect.signature(generate).parameters:
        raise RuntimeError("n/a (sampler without stats): rollout.generate takes no stats= argument in this tree")
    st = {}
    ro = generate(model, prompts, k=2, max_new_tokens=new, temperature=1.0, stop_ids=stops, pad_id=stops[0], seed=0,
                  stats=st)
    lens, plen = ro.mask.sum(1).long().tolist(), ro.prompt_mask.sum(1).tolist()
    mv = decode_moved(model.cfg, st, w_bytes=4, kv_bytes=4)
    R = len(lens)
    roof = decode_roofline(model.cfg, R, live_cols(plen, lens), w_bytes=4, kv_bytes=4)["total"] / R
    return dict(st, util=mv["util"], token=mv["per_token"], roofline_token=roof, ratio=mv["per_token"] / roof)

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
    bad = [a for a in argv if a not in flags and not a.startswith(("--steps=", "--threads=", "--json="))]
    if bad:  # a typo must not silently start a 12-minute run with the defaults
        print(f"error: unknown argument {bad[0]!r}; use --quick, --skip-trl, --gpu, --steps=N, --threads=N, "
              f"--json=PATH", file=sys.stderr)
        sys.exit(2)
    quick, skip_trl, gpu = (f in argv for f in flags)
    if gpu and (device.type != "cuda" or quick):
        print("error: --gpu runs fixed sizes, drop --quick" if quick and device.type == "cuda" else
              "error: --gpu is the GPU bring-up and needs a CUDA device; torch.cuda.is_available() is False here",
              file=sys.stderr)
        sys.exit(2)
    arg = lambda name, default: next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), default)
    steps, threads = int(arg("steps", 1 if quick else 2 if gpu else 3)), int(arg("threads", 0))
    if threads:
        torch.set_num_threads(threads)
    tests = cuda_tests(timeout=180) if gpu else None  # first: a broken CUDA path shows before minutes of timing
    n_prompts, new, reps = (8, 16, 1) if quick else (128, 256, 2) if gpu else (32, 64, 2)
    work = WORK["gpu" if gpu else "cpu"]
    timeout = 120 if gpu else 3600  # per train.py / TRL run: the whole --gpu run must fit a lent GPU's ~10 minutes
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar would cut into the table
    model, tok = from_pretrained(device=device)
    n_params, cfg = model.num_params(), model.cfg
    stops = stop_token_ids(tok, cfg)
    probs = load_problems("synthetic:1", "train")
    prompts = [chat_ids(tok, p["prompt"]) for p in probs[:n_prompts]]
    sample = [chat_ids(tok, p["prompt"]) for p in probs[:64]]
    prompt_len = sum(len(p) for p in sample) / len(sample)
    head = shared_prefix_len(sample)  # the chat template's common head

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_name()}, {torch.backends.cpu.get_cpu_capability()}"
    ver = versions()
    out = Rows(arg("json", os.path.join(ROOT, "out", "bench.json")), machine=where, device=device.type,
               threads=torch.get_num_threads(), versions=ver, argv=argv, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"machine: {device} ({torch.get_num_threads()} threads; {where}), torch {ver['torch']}, transformers "
          f"{ver['transformers']}, TRL {ver['trl'] or 'not installed'}, load avg {os.getloadavg()[0]:.1f} at start; "
          f"SmolLM2-135M-Instruct, {n_params / 1e6:.1f}M params; rows also go to {out.path}")
    peak = {dt: matmul_peak(dt) for dt in (torch.float32, torch.bfloat16)}
    fast_bf16 = peak[torch.bfloat16] > peak[torch.float32]  # CPUs without native bf16 (AVX2 only) run it ~100x slower
    out.add("peak", "matmul", f"matmul peak ({8192 if device.type == 'cuda' else 2048}^3): fp32 "
            f"{peak[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {peak[torch.bfloat16] / 1e9:.0f} GFLOP/s",
            fp32=peak[torch.float32], bf16=peak[torch.bfloat16])

    # accounting: arithmetic only, so it comes first and always prints
    acc, S = accounting_rows()
    print(f"\naccounting: {QWEN} shape, bf16 weights and KV cache, fp32 logits; {2048} rollouts a GPU (16-GRPO on 4 "
          f"GPUs), prompts of 250 tokens, completions mean 768 of <= 3072 (10% truncated), {acc[0]['live_cols']:.0f} "
          f"live key columns per generated token; per-token bytes of a design = plan.decode_moved on the counters "
          f"bench.simulate predicts (slots refilled, host check every 16 steps, power-of-two compaction at the end)")
    print(f"  {'rows':>5s} {'roofline GB/step':>16s} {'tok/s H100':>10s} {'tok/s H200':>10s} | {'design':28s} "
          f"{'util':>5s} {'GB/step':>7s} {'x roofline':>10s} {'graphs':>6s}")
    designs = dict(blocks="own columns, 128-col blocks", static=f"static width {S} columns")
    for r in acc:
        for i, (d, label) in enumerate(designs.items()):
            x = r[d]
            left = (f"  {r['rows']:5d} {r['roofline_step'] / 1e9:16.2f} {r['h100']:10,.0f} {r['h200']:10,.0f}" if i == 0
                    else " " * 46)
            out.add("accounting", f"{r['rows']} rows, {d}", f"{left} | {label:28s} {x['util']:5.1%} "
                    f"{x['token'] * r['rows'] / 1e9:7.2f} {x['ratio']:9.2f}x {x['stats']['graphs']:6d}",
                    rows=r["rows"], design=label, roofline_step=r["roofline_step"], roofline_tok_s_h100=r["h100"],
                    roofline_tok_s_h200=r["h200"], util=x["util"], bytes_per_token=x["token"], ratio=x["ratio"],
                    stats=x["stats"])
    print("  target: <= 1.3x the roofline; the real sampler's counters (generate(..., stats=)) replace the prediction "
          "where it has them:")
    out.run("accounting", "CPU run", lambda: measured_stats(model, prompts, new, stops),
            lambda r: f"  {'CPU run':14s} SmolLM2 fp32, {n_prompts} prompts x 2 x {new} tokens: util {r['util']:.1%}, "
                      f"{r['token'] / 1e6:.1f} MB a token vs roofline {r['roofline_token'] / 1e6:.1f} MB "
                      f"({r['ratio']:.2f}x), {r['graphs']} graphs, {r['steps']} steps")

    # mismatch first, while the weights are still exactly fp32 (the sampler rows cast them to bf16 and back)
    mis_p, mis_new = (prompts, new) if fast_bf16 else (prompts[:2], 8)
    print(f"\nmismatch, sampler with bf16 weights vs the trainer's fp32 forward, same rollouts ({len(mis_p)} prompts "
          f"x 2 x {mis_new} tokens{'' if fast_bf16 else ': a small batch, bf16 is slow here'}):")
    mis = out.run("mismatch", "bf16 vs fp32", lambda: mismatch(model, mis_p, mis_new, stops),
                  lambda m: f"  mean abs d logp {m['mismatch_mean']:.2e}, max {m['mismatch_max']:.2e}, k3 KL "
                            f"{m['mismatch_k3']:.2e}")

    hf_dir = tempfile.mkdtemp(prefix="bench_hf_")
    save_pretrained(model, tok, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    print(f"\nsampler: {n_prompts} prompts x 2 samples x {new} new tokens, T=1; tok/s = generated tokens up to and "
          f"including the stop, best of {reps}\n  {'dtype':14s} {'ours tok/s':>11s} {'HF tok/s':>9s}")
    sampler = [("fp32", lambda: (model, hf, prompts, new, reps, nullcontext))]
    if fast_bf16:
        sampler.append(("bf16", lambda: (model.bfloat16(), hf.bfloat16(), prompts, new, reps, nullcontext)))
    else:  # real bf16 on a small batch only, and the emulation (rollout.Bf16Emulation) at full size
        print("  (bf16 matmul is slower than fp32 here: no bf16 RL-step row; bf16 sampling on 2 prompts x 8 tokens, "
              "and emulated, bf16 rounding at fp32 speed, at full size)")
        sampler += [("bf16 emul", lambda: (model, hf, prompts, new, reps, Bf16Emulation)),
                    ("fp32 2x8", lambda: (model, hf, prompts[:2], 8, 1, nullcontext)),
                    ("bf16 2x8", lambda: (model.bfloat16(), hf.bfloat16(), prompts[:2], 8, 1, nullcontext))]
    samp = {}
    for name, make in sampler:
        def fn(make=make):
            m, h, ps, n, rp, mode = make()
            return dict(zip(("ours", "hf"), bench_sampler(m, h, tok, ps, n, rp, mode)))
        r = out.run("sampler", name, fn, lambda r: f"  {name:14s} {r['ours']:11.1f} {r['hf']:9.1f}")
        if r:
            samp[name] = r
    del model, hf

    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if fast_bf16 else [])
    print(f"\nRL step: {work[0]} prompts x k={work[1]}, <= {work[2]} new tokens, T=1, beta 0, 1 update; mean of "
          f"{steps} step(s) after 1 warm-up{'; --skip-trl: no TRL row' if skip_trl else ''}\n  {'trainer':14s} "
          f"{'dtype':5s} "
          f"{'gen s':>6s} {'update s':>8s} {'step s':>7s} {'trained tok':>11s} {'upd GFLOP/s':>11s} {'MFU':>6s} "
          f"{'peak mem':>9s}")

    def with_mfu(r, dt):
        flops = r["tokens"] * (6 * n_params + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * r["seq"])
        r["fs"] = flops / max(r["update"], 1e-9)
        r["mfu"] = r["fs"] / peak[dict(dtypes)[dt]]
        return r

    rl = []  # (trainer, dtype, result)
    jobs = []
    for dt, _ in dtypes:
        extra = [] if dt == "fp32" else ["--dtype=bfloat16"]
        jobs.append(("ours", dt, lambda extra=extra: run_ours(work, steps, prompt_len, head, threads, extra, timeout)))
        if not gpu and dt == "fp32":
            no_skip = lambda: run_ours(work, steps, prompt_len, head, threads, ["--kl_coef=1e-9"], timeout)
            jobs.append(("ours no-skip*", dt, no_skip))
        if not skip_trl:
            jobs.append((f"TRL {ver['trl'] or ''}".strip(), dt,
                         lambda dt=dt: run_trl(hf_dir, steps, threads, work, dt == "bf16", timeout)))
    for name, dt, fn in jobs:
        r = out.run("RL step", f"{name} {dt}", lambda: with_mfu(fn(), dt),
                    lambda r: f"  {name:14s} {dt:5s} {r['gen']:6.2f} {r['update']:8.2f} {r['gen'] + r['update']:7.2f} "
                              f"{r['tokens']:11.0f} {r['fs'] / 1e9:11.1f} {r['mfu']:6.1%} {r['mem'] / 2**30:7.2f}GB")
        rl.append((name, dt, r))
    shutil.rmtree(hf_dir, ignore_errors=True)
    ok = [x for x in rl if x[2]]
    if not gpu and ok and ok[0][0] == "ours":
        print(f"  * ours drops zero-variance groups before the forward (zero_var {ok[0][2]['zero_var']:.2f} of groups "
              f"this run); TRL trains on every row. 'no-skip' keeps them (--kl_coef=1e-9), which also loads a frozen "
              f"reference and adds its log-prob forward to gen. Ours forwards each prompt once per group and the "
              f"common chat-template head ({head} tokens) once; its trained tokens are estimated from its log (kept "
              f"groups x (prompt - head + k x mean completion) + head). TRL forwards every row's prompt; its tokens "
              f"are counted. MFU is against the measured matmul peak of the row's dtype")

    # one markdown table, ready for the README's Speed section; a failed row says so
    trl = {dt: r for name, dt, r in rl if name.startswith("TRL")}
    step = lambda r: f"{r['gen'] + r['update']:.2f} s ({r['gen']:.2f} + {r['update']:.2f})"
    print(f"\n| work ({where}, SmolLM2-135M-Instruct; torch {ver['torch']}, transformers {ver['transformers']}, TRL "
          f"{ver['trl']}) | ours | peer | ratio |\n|---|---|---|---|")
    for name, r in samp.items():
        work_txt = "2 prompts x 2 x 8 tokens" if "2x8" in name else f"{n_prompts} prompts x 2 x {new} tokens"
        print(f"| sampler, {work_txt}, T=1, {name.split()[0]}{' emulated' if 'emul' in name else ''} | {r['ours']:.1f} "
              f"tok/s | `generate` {r['hf']:.1f} tok/s | {r['ours'] / r['hf']:.2f}x |")
    if mis:
        print(f"| sampler bf16 vs trainer fp32 log-probs, same rollouts ({len(mis_p)} x 2 x {mis_new}) | mean abs d "
              f"logp {mis['mismatch_mean']:.2e}, max {mis['mismatch_max']:.2e} | | |")
    for name, dt, r in rl:
        if name == "ours":
            t = trl.get(dt)
            peer = f"TRL {step(t)}, MFU {t['mfu']:.1%}, {t['mem'] / 2**30:.1f} GB" if t else "no TRL row (see above)"
            ratio = f"{(t['gen'] + t['update']) / (r['gen'] + r['update']):.2f}x" if t and r else ""
            mine = f"{step(r)}, MFU {r['mfu']:.1%}, {r['mem'] / 2**30:.1f} GB" if r else "failed"
            print(f"| RL step, {work[0]} prompts x {work[1]} x <= {work[2]} tokens, {dt} (gen + update) | {mine} | "
                  f"{peer} | {ratio} |")
    for r in acc:
        print(f"| decode bytes, {QWEN} bf16, {r['rows']} rows: roofline {r['roofline_step'] / 1e9:.1f} GB/step, "
              f"{r['h100']:,.0f} / {r['h200']:,.0f} tok/s on H100 / H200 | predicted (own columns, 128-col blocks) "
              f"{r['blocks']['ratio']:.2f}x the roofline, util {r['blocks']['util']:.1%} | static width: "
              f"{r['static']['ratio']:.2f}x | |")
    if tests:
        print(f"| CUDA tests, `pytest -q tests -k cuda` | {tests} | | |")
    failed = [f"{x['table']}: {x['name']}" for x in out.doc["rows"] if "error" in x]
    print(f"\n{len(out.doc['rows'])} rows written to {out.path}" + (f"; failed: {', '.join(failed)}" if failed else ""))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl-worker"]:
        trl_worker(sys.argv[2], *map(int, sys.argv[3:8]), bool(int(sys.argv[8])))
    else:
        main(sys.argv[1:])
