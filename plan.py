"""
Memory and step-time plan of a train.py config on a given number and kind of GPU, without loading weights (issue 12).

    python train.py configs/qwen_math_grpo16.py --dry_run --gpu=h100 --gpus=8

Prints, per GPU, each memory line at the rollout and at the update phase, the peak, and an estimated step time; exits 2
with one error line if the peak does not fit. The architecture comes from config.json (a local directory, or the
HF cache, never the network), else from ARCHS below. Every number is an estimate from the formulas here, not a
measurement: none of it has been checked on a GPU yet (no GPU was lent to this work).
"""
import json
import os
import sys

import torch

from model import DEFAULT_MODEL, Transformer, config_from_hf

# GiB as torch.cuda reports it (a bit under the marketed GB), dense bf16 TFLOP/s and HBM GB/s from the datasheets
# (SXM parts), GPU-to-GPU GB/s one way (NVLink; L4: PCIe 4.0 x16)
GPUS = {"h100": (79.6, 989, 3350, 450), "h200": (140.4, 989, 4800, 450), "a100-80g": (80.0, 312, 2039, 300),
        "a100-40g": (40.0, 312, 1555, 300), "l4": (22.5, 121, 300, 32)}
USABLE = 0.9        # of GPU memory: the CUDA context, cuBLAS workspaces and the caching allocator's fragmentation
MFU = 0.4           # update and prefill: achieved / peak matmul FLOP/s (a typical eager-PyTorch figure)
DECODE_EFF = 0.5    # decode: achieved / roofline (max of HBM time and FLOP time per step)
LAUNCH_S = 200e-6   # eager decode, per block and step: ~20 ops at ~10 us of Python + kernel launch (CUDA graphs: 0)
PROMPT_TOKENS = 256  # prompt + chat template per row (MATH prompts are ~50-200 tokens); the plan does not read data
MEAN_NEW = 0.25     # mean completion length / max_new_tokens, for the update's tokens (decode runs to the longest row)
# the public config.json of the models the configs name, for planning without a download
_QWEN = dict(model_type="qwen2", num_hidden_layers=28, max_position_embeddings=4096)
ARCHS = {
    "Qwen/Qwen2.5-Math-1.5B": dict(_QWEN, vocab_size=151936, hidden_size=1536, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
    "Qwen/Qwen2.5-Math-7B": dict(_QWEN, vocab_size=152064, hidden_size=3584, num_attention_heads=28,
                                 num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False),
    DEFAULT_MODEL: dict(model_type="llama", vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True),
}
ARCHS["HuggingFaceTB/SmolLM2-135M-Instruct"] = ARCHS[DEFAULT_MODEL]
GiB = 2 ** 30


def model_config(name):
    """The ModelConfig of `name` from its config.json (local dir or HF cache), else ARCHS; ValueError if neither."""
    path = os.path.join(name, "config.json") if os.path.isdir(name) else None
    if path is None and name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")  # looks at the local cache only
        path = hit if isinstance(hit, str) else None
    if path and os.path.isfile(path):
        with open(path) as f:
            return config_from_hf(json.load(f), where=path)
    if name in ARCHS:
        return config_from_hf(ARCHS[name], where=f"plan.py ARCHS[{name!r}]")
    raise ValueError(f"plan: no config.json for {name!r} (not a local HF directory, not in the HF cache) and not in "
                     f"plan.py's ARCHS ({', '.join(ARCHS)}); download its config.json once or add it to ARCHS")


# -----------------------------------------------------------------------------
# byte accounting of one decode step (bench.py's accounting table and the GPU check use these; decode is memory-bound,
# so bytes moved per generated token set its speed)

def shape(m):
    """A ModelConfig, or an HF config.json dict -> ModelConfig."""
    return config_from_hf(m, where="plan.shape") if isinstance(m, dict) else m


def kv_col_bytes(m, kv_bytes=2):
    """Bytes of one token column of the KV cache: K and V, every layer."""
    m = shape(m)
    return 2 * m.n_layers * m.n_kv_heads * m.head_dim * kv_bytes


def weights_read(m, w_bytes=2):
    """Bytes of weights one decode step reads: every matrix once. An untied input embedding is a gather of B rows
    (not counted); a tied one is read whole as the lm_head."""
    m = shape(m)
    with torch.device("meta"):
        n = Transformer(m).num_params()  # tied embeddings counted once
    return (n - (0 if m.tie_embeddings else m.vocab_size * m.dim)) * w_bytes


def decode_roofline(m, rows, cols, w_bytes=2, kv_bytes=2, logit_bytes=4):
    """Bytes one decode step of `rows` rows must move, each row reading `cols` live key columns (or their mean):
    the weights once, the live cache read, one new K/V column written per row, the logits (rows, V) written in
    logit_bytes (4: the sampler samples from fp32 logits). Nothing else: no padding rows, no unwritten columns."""
    m = shape(m)
    kv = kv_col_bytes(m, kv_bytes)
    out = dict(weights=weights_read(m, w_bytes), kv_read=rows * cols * kv, kv_write=rows * kv,
               logits=rows * m.vocab_size * logit_bytes)
    out["total"] = sum(out.values())
    return out


def decode_moved(m, stats, w_bytes=2, kv_bytes=2, logit_bytes=4):
    """What a sampler run moved, from generate(..., stats=dict)'s counters (whatever sampler filled them): steps
    (decode forwards), row_steps (sum of rows over them), key_cols (sum of rows x key columns attention read),
    tokens (generated). Bytes = steps x weights + key_cols x KV column + row_steps x (new K/V + logits): padding rows
    and unread-but-computed columns cost what live ones do. Also per_token and util = tokens / row_steps."""
    m = shape(m)
    kv = kv_col_bytes(m, kv_bytes)
    out = dict(weights=stats["steps"] * weights_read(m, w_bytes), kv_read=stats["key_cols"] * kv,
               kv_write=stats["row_steps"] * kv, logits=stats["row_steps"] * m.vocab_size * logit_bytes)
    out["total"] = sum(out.values())
    out["per_token"] = out["total"] / max(stats["tokens"], 1)
    out["util"] = stats["tokens"] / max(stats["row_steps"], 1)
    return out


def tokens_per_s(bytes_per_token, gpu):
    """Tokens/s when every byte moves at the GPU's HBM bandwidth (GPUS): the roofline, never reached."""
    return GPUS[gpu][2] * 1e9 / bytes_per_token


def mbu(bytes_moved, seconds, gpu):
    """Model bandwidth utilisation: achieved bytes/s (bytes_moved: decode_moved's total) over the GPU's HBM peak."""
    return bytes_moved / seconds / (GPUS[gpu][2] * 1e9)


def live_cols(prompt_lens, lens):
    """Mean live key columns per generated token: row r's t-th token attends to its prompt + t earlier tokens."""
    cols = sum(p * c + c * (c - 1) / 2 for p, c in zip(prompt_lens, lens))
    return cols / max(sum(lens), 1)

# -----------------------------------------------------------------------------


def plan(cfg):
    """cfg: train.py's Config. -> dict: the architecture, per-GPU memory lines (bytes) at the rollout and the update
    phase, and the step-time estimate (seconds). Pure arithmetic: nothing is allocated."""
    gpu = cfg.gpu or "h100"
    if gpu not in GPUS:
        raise ValueError(f"--gpu={gpu}: unknown GPU kind; expected one of {', '.join(GPUS)}")
    world = cfg.gpus or 1
    mem, tflops, hbm, link = GPUS[gpu]
    m = model_config(cfg.model)
    with torch.device("meta"):
        N = Transformer(m).num_params()  # tied embeddings counted once
    L, D, Dq, Dkv, I, V = m.n_layers, m.dim, m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.hidden_dim, m.vocab_size
    bf16 = cfg.dtype == "bfloat16"
    a = 2 if bf16 else 4  # bytes of a matmul input/output: autocast bf16, else fp32
    shard = world if cfg.fsdp else 1  # --fsdp: weights, grads and AdamW state sharded over ranks

    # rollout, as the sampler is designed (issue 22): sampling in bf16 (--sample_dtype, else --dtype) runs on a bf16
    # copy of the weights (refreshed after each optimizer step, kept through the update; FSDP: the gathered params are
    # bf16) with a bf16 KV cache; the cache is written in place (no copy per step); R slots of prompt + max_new_tokens
    # columns that fit --sample_mem_gib, refilled from the queue as rows finish (continuous batching)
    P = cfg.prompts_per_step // world  # prompts per GPU
    rows, S = P * cfg.k, PROMPT_TOKENS + cfg.max_new_tokens
    s_bf16 = (getattr(cfg, "sample_dtype", "") or cfg.dtype) == "bfloat16"  # bfloat16_emul: fp32 weights and cache
    sb = 2 if s_bf16 else 4  # bytes of a sampling weight / cache element
    kv_tok = kv_col_bytes(m, sb)
    slots = min(rows, max(1, int(cfg.sample_mem_gib * GiB // (S * kv_tok)))) if cfg.sample_mem_gib else rows
    if cfg.compile:  # compiled decode: power-of-two slot counts (one graph each)
        slots = 1 << (slots.bit_length() - 1)
    # when the queue is empty live rows are compacted into a smaller cache (a gather, not in place): for a moment both
    # exist, the new one at most half (compiled: power-of-two buckets) or 3/4 (eager) of the old
    shrink = 1.5 if cfg.compile else 1.75
    # what one block keeps for backward, bytes per token (measured with saved_tensors_hooks, tests/test_bench.py):
    # fp32: both RMSNorms' input and normalised x (4 D), their rsqrt (2) and SDPA's logsumexp (H); the matmul inputs
    # (bf16: 5 casts, q/k/v/gate/up; fp32: the 2 norm outputs); q, k, v, SDPA's output (2 Dq + 2 Dkv) and SwiGLU's
    # gate, silu, up and product (4 I) in the compute dtype. Qwen3's q/k norms add a little, not counted
    act_tok = 4 * (4 * D + m.n_heads + 2) + (2 * 5 * D if bf16 else 4 * 2 * D) + a * (2 * Dq + 2 * Dkv + 4 * I)
    # tokens of one micro-batch: the budget (or one row, if longer), at most one mini-batch's rows
    micro = min(max(cfg.token_budget, S), max(1, cfg.prompts_per_update // world) * cfg.k * S)
    acts = micro * (L * 4 * D + act_tok) if cfg.grad_ckpt else micro * L * act_tok  # ckpt: block inputs + one block
    ref = cfg.kl_coef > 0 or cfg.algo != "grpo"  # a frozen fp32 reference model
    both = dict(weights=4 * N / shard, adamw=8 * N / shard, ref=4 * N if ref else 0,
                copy=2 * N if s_bf16 and shard == 1 else 0)  # the sampler's bf16 weights, kept between rollouts
    roll = dict(both, gather=sb * N if shard > 1 else 0,  # FSDP: the sampler runs on gathered full weights
                kv=slots * S * kv_tok * shrink, sampler=4 * slots * V * 4,  # logits, log-softmax, probs, cdf (R, V)
                # CUDA graphs (compiled decode): the pool holds one step's buffers of the largest graph, mostly
                # the sampler's (R, V) tensors again; an estimate, not measured
                pool=4 * slots * V * 4 if cfg.compile else 0)
    upd = dict(both, grads=4 * N / shard, acts=acts, logits=micro * V * 4,  # each chunk's fp32 log-softmax
               casts=2 * N if bf16 else 0)  # autocast's bf16 copy of every weight, cached for the forward
    peak = max(sum(roll.values()), sum(upd.values()))

    # time per step: decode bound by HBM (decode_roofline: weights once + live cache + logits) or FLOPs per step, over
    # the generated tokens / R steps with a full batch, plus max_new_tokens steps for the drain (counted as full);
    # prefill each prompt once; update 6 N FLOPs per trained token (8 N with activation checkpointing's second
    # forward) + causal attention; all at the efficiencies above. Attention is fused (no O(T^2) scores, no K/V
    # repeated to every head): the math-kernel fallback is not counted
    peak_fs = tflops * 1e12 / (1 if bf16 else 2)  # fp32 runs as TF32: half the bf16 rate
    gen_tokens = rows * MEAN_NEW * cfg.max_new_tokens
    ctx = PROMPT_TOKENS + MEAN_NEW * cfg.max_new_tokens / 2  # live key columns per token, on average
    step = decode_roofline(m, slots, ctx, w_bytes=sb, kv_bytes=sb)
    step_flops = slots * (2 * N + 4 * L * Dq * ctx)
    launch = 0 if cfg.compile else LAUNCH_S * L
    steps = gen_tokens / slots + cfg.max_new_tokens
    decode = steps * (max(step["total"] / (hbm * 1e9), step_flops / peak_fs) / DECODE_EFF + launch)
    prefill = 2 * N * P * PROMPT_TOKENS / (MFU * peak_fs)
    tokens = P * (PROMPT_TOKENS + cfg.k * MEAN_NEW * cfg.max_new_tokens)  # prompts once per group (the scorer)
    per_tok = (8 if cfg.grad_ckpt else 6) * N + 6 * L * Dq * (PROMPT_TOKENS + MEAN_NEW * cfg.max_new_tokens) + (
        2 * N if ref else 0)
    update = tokens * per_tok / (MFU * peak_fs)
    n_updates = cfg.prompts_per_step // cfg.prompts_per_update
    comm = n_updates * 2 * (world - 1) / world * 4 * N / (link * 1e9)  # ring all-reduce of fp32 grads per update
    return dict(gpu=gpu, world=world, mem=mem, m=m, N=N, bf16=bf16, shard=shard, P=P, rows=rows, S=S, micro=micro,
                slots=slots, steps=steps, step_bytes=step, kv_bytes=sb,
                roll=roll, upd=upd, peak=peak, fits=peak <= USABLE * mem * GiB, gen=decode + prefill, decode=decode,
                prefill=prefill, update=update, comm=comm, step=decode + prefill + update + comm)


LABELS = dict(weights="weights, fp32 (train.py keeps fp32 master weights)", adamw="AdamW m and v, fp32",
              grads="gradients, fp32", ref="frozen reference model, fp32",
              copy="the sampler's bf16 copy of the weights", casts="autocast's bf16 weight copies (update forward)",
              gather="FSDP: full weights gathered for the sampler", kv="sampler KV cache (+ compaction's copy)",
              sampler="sampler logits / probs (4 x R x V fp32)", pool="CUDA-graph pool (estimate)",
              acts="activations kept for backward",
              logits="log-softmax kept for backward (tokens x V fp32)")

HINTS = dict(kv="--sample_mem_gib (fewer decode slots), fewer rollouts per GPU (prompts_per_step, k, more --gpus) "
                "or a smaller max_new_tokens",
             sampler="fewer rollouts per GPU (prompts_per_step, k, more --gpus)",
             acts="--grad_ckpt=True or a smaller --token_budget", logits="a smaller --token_budget")


def report(p, cfg):
    """The plan as text lines."""
    m = p["m"]
    out = [f"plan: {cfg.model}, {p['N'] / 1e9:.3f}B params ({m.n_layers} layers, dim {m.dim}, {m.n_heads}/"
           f"{m.n_kv_heads} heads x {m.head_dim}, mlp {m.hidden_dim}, vocab {m.vocab_size}) on {p['world']} x "
           f"{p['gpu']} ({p['mem']} GiB each); {cfg.dtype}, grad_ckpt {cfg.grad_ckpt}, compile {cfg.compile}, "
           f"{'FSDP' if p['shard'] > 1 else 'replicated weights (DDP)'}",
           f"per GPU: {p['P']} prompts x k={cfg.k} = {p['rows']} rollouts of <= {PROMPT_TOKENS} + {cfg.max_new_tokens}"
           f" tokens, decoded {p['slots']} at a time ({'bf16' if p['kv_bytes'] == 2 else 'fp32'} weights and KV "
           f"cache); micro-batches of <= {p['micro']} tokens",
           f"  {'memory per GPU, GiB':58s} {'rollout':>8s} {'update':>8s}"]
    for key, label in LABELS.items():
        r, u = p["roll"].get(key), p["upd"].get(key)
        if r or u:
            out.append(f"  {label:58s} {r / GiB if r else 0:8.2f} {u / GiB if u else 0:8.2f}")
    out.append(f"  {'total':58s} {sum(p['roll'].values()) / GiB:8.2f} {sum(p['upd'].values()) / GiB:8.2f}")
    out.append(f"peak {p['peak'] / GiB:.2f} GiB of {USABLE * p['mem']:.1f} usable ({USABLE:.0%} of {p['mem']}): "
               f"{'fits' if p['fits'] else 'DOES NOT FIT'}")
    run = p["step"] * cfg.num_steps
    run = f"{run / 3600:.1f} h" if run > 7200 else f"{run / 60:.1f} min"
    out.append(f"step time, estimated: {p['step']:.1f} s = generation {p['gen']:.1f} (decode {p['decode']:.1f}, "
               f"prefill {p['prefill']:.1f}) + update {p['update']:.1f} + gradient all-reduce {p['comm']:.1f}; "
               f"{cfg.num_steps} steps: {run}")
    b = p["step_bytes"]
    out.append(f"decode step at {p['slots']} rows: {b['total'] / 1e9:.2f} GB moved (weights {b['weights'] / 1e9:.2f}, "
               f"KV read {b['kv_read'] / 1e9:.2f}, KV written {b['kv_write'] / 1e9:.3f}, logits "
               f"{b['logits'] / 1e9:.2f}); "
               f"{p['steps']:.0f} steps a rollout phase")
    out.append(f"assumptions: prompts of {PROMPT_TOKENS} tokens, completions of {MEAN_NEW:.0%} of max_new_tokens on "
               f"average, every group trained (no zero-variance drop), decode with a full batch (finished rows "
               f"refilled) + max_new_tokens steps to drain, at {DECODE_EFF:.0%} of the roofline, update and prefill at "
               f"{MFU:.0%} MFU, rewards and eval not counted; the sampler as issue 22 designs it: bf16 weight copy "
               f"and bf16 cache when sampling in bf16, cache written in place (no per-step copy), fused attention "
               f"(no O(T^2) fp32 scores, no math-kernel fallback)")
    out.append("not counted: the CUDA context and cuBLAS/NCCL workspaces (inside the 10% margin), the prefill's "
               "transient activations, the allocator's fragmentation beyond the margin; the CUDA-graph pool is an "
               "estimate. Estimates from plan.py's formulas, never measured on a GPU")
    return out


def main(cfg):
    """train.py --dry_run: print the plan; exit 0 if it fits, else one error line and exit 2."""
    try:
        p = plan(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(report(p, cfg)))
    if not p["fits"]:
        phase, lines = max(("rollout", p["roll"]), ("update", p["upd"]), key=lambda x: sum(x[1].values()))
        line = max(lines, key=lines.get)
        print(f"error: plan: {cfg.model} needs {p['peak'] / GiB:.1f} GiB per GPU at the {phase} phase, more than the "
              f"{USABLE * p['mem']:.1f} GiB usable on a {p['gpu']} (largest: {LABELS[line]}, {lines[line] / GiB:.1f} "
              f"GiB); try {HINTS.get(line, 'more --gpus or a GPU with more memory')}", file=sys.stderr)
        sys.exit(2)
    sys.exit(0)
