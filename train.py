"""
nanoGRPO training: one loop for GRPO-k (k=2 is 2-GRPO), 2-GRPO+RS, and DPO (online and offline).

    python train.py                                   # 2-GRPO, SmolLM2-135M-Instruct, synthetic arithmetic (CPU ok)
    python train.py configs/grpo16.py --num_steps=50  # a config file, then overrides
    python train.py configs/dpo.py --resume           # continue from out_dir/ckpt.pt
    torchrun --nproc_per_node=2 train.py configs/grpo2.py
    torchrun --nproc_per_node=8 train.py configs/qwen_math_grpo16.py --fsdp=True --compile=False  # FSDP2 shards

One step follows the paper's protocol (verl's GRPO, paper.md section 10):
  1. a generation batch of prompts_per_step prompts, k rollouts each (rollout.py)
  2. binary math rewards (reward.py) and group advantages (loss.py, Eq. 6)
  3. drop groups whose rewards are all equal: they carry no gradient (2-GRPO's 1(r1 != r2) in Eq. 14);
     with resample=True, refill them with fresh prompts (2-GRPO+RS) within a rollout budget
  4. one optimizer update per mini-batch of prompts_per_update prompts; the policy moves between mini-batches, so
     from the second one on the old/new ratio differs from 1 and clipping acts, as in verl
  5. log, eval on held-out problems every eval_every steps, checkpoint atomically
DPO uses the same loop: a "group" is a (chosen, rejected) pair instead of k rollouts, and the loss is Eq. 9.

Where this loop departs from verl / TRL (loss.py's docstring lists the loss conventions):
  - old_logp: the sampler's own log-probs by default, a ratio of exactly 1 in fp32 on a CPU only (on a GPU kernels
    differ by shape, bf16 sampling from training); --old_logp=recompute (the qwen configs) is verl's compute_log_prob
  - the LR scheduler steps per optimizer update (verl: per generation batch); warm-up starts at lr/W (verl: at 0)
  - kept groups are split evenly into prompts_per_step / prompts_per_update mini-batches (verl: a fixed mini-batch
    size, length-balanced); under DDP the global list is split as one process would, then each mini-batch is sharded
  - a truncated rollout (no stop token by max_new_tokens) scores 0, whatever it contains
  - online DPO drops tied pairs (equal rewards), as GRPO drops zero-variance groups
  - --resume refuses a changed lr / weight_decay (the restored optimizer would silently keep the checkpoint's)
"""
import atexit
import os
import random
import sys
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import lru_cache

import torch
import torch.distributed as dist
from tqdm import tqdm


@dataclass
class Config:
    # model and data
    model: str = "smollm2-135m-instruct"  # from_pretrained name: built-in, HF dir, hub id or .gguf file
    data: str = "synthetic:1"             # training problems (data.load_problems); dpo_offline: a preference .jsonl
    eval_data: str = ""                   # held-out problems; "" = the test split of `data` (a file: a fixed-hash ~20%
                                          # of its problems, which training then never sees)
    train_n: int = 0                      # train on a seeded subset of this many problems (more epochs); 0 = all
    fallbacks: str = "boxed,last_number"  # answer extraction order (reward.py): boxed, answer, hash, last_number
    # algorithm
    algo: str = "grpo"                    # grpo | dpo (online, pairs from k=2 rollouts) | dpo_offline
    k: int = 2                            # rollouts per prompt; k=2 is 2-GRPO
    adv_scale: str = "std"                # std (Eq. 6) | batch (group mean, batch std: TRL, LitePPO) | none (Dr. GRPO)
    adv_unbiased: bool = False            # Bessel std as in verl/TRL (+-0.707 at k=2) instead of the paper's +-1
    agg: str = "seq_mean"                 # loss aggregation: seq_mean (paper) | token_mean (verl) | const (Dr. GRPO)
    clip_low: float = 0.2                 # PPO clip range [1 - clip_low, 1 + clip_high] (clip-higher, paper C.1)
    clip_high: float = 0.28
    dual_clip: float = 0.0                # c > 1 caps the loss of A<0 tokens at -A*c (verl's clip_ratio_c=3); 0 = off
    kl_coef: float = 0.0                  # k3 KL to the initial policy; 0 = no reference model (verl's default)
    beta: float = 0.1                     # DPO temperature
    label_smoothing: float = 0.0          # conservative DPO
    ipo: bool = False                     # IPO loss instead of sigmoid DPO
    resample: bool = False                # 2-GRPO+RS: replace zero-variance groups with fresh prompts
    norm_dropped: bool = False            # count dropped groups' rows in the loss divisor, as verl/TRL (loss.py item 4)
    rs_max_k: int = 16                    # RS budget: at most prompts_per_step * rs_max_k rollouts a step (16-GRPO's)
    # batch sizes, in prompts (or pairs)
    prompts_per_step: int = 32            # generation batch
    prompts_per_update: int = 32          # optimizer mini-batch; prompts_per_step / prompts_per_update updates a step
    token_budget: int = 8192              # micro-batch size in tokens (prompt + completion), gradient accumulation
    num_steps: int = 20
    # optimizer: AdamW, linear warm-up then constant (paper C.1)
    lr: float = 1e-5
    warmup_steps: int = 0                 # in optimizer updates
    weight_decay: float = 0.0
    grad_clip: float = 1.0                # max grad norm; 0 = off
    # sampling during training
    max_new_tokens: int = 64
    sample_mem_gib: float = 0.0           # KV cache budget of the sampler per rank: generate in chunks of whole
                                          # prompts that fit (same rollouts: per-row seeds); 0 = the whole batch at once
    temperature: float = 1.0
    sample_dtype: str = ""                # "" = dtype | float32 | bfloat16 (autocast) | bfloat16_emul (rollout.py's
                                          # Bf16Emulation: bf16 rounding at fp32 speed, for AVX2 CPUs; an emulation)
    old_logp: str = "sampler"             # sampler (its own log-probs) | recompute (the trainer's no-grad forward
                                          # before the updates, verl's compute_log_prob)
    tis_cap: float = 0.0                  # C > 0: weight tokens by min(pi_old / pi_sampler, C) (TIS); 0 = off
    # eval, logging, checkpoints
    eval_every: int = 10                  # held-out greedy accuracy every this many steps (and at the end); 0 = end only
    eval_n: int = 0                       # held-out problems; 0 = all
    sample_every: int = 5                 # print two decoded rollouts every this many steps; 0 = never
    save_every: int = 0                   # checkpoint every this many steps; 0 = only at the end
    out_dir: str = "out"
    resume: bool = False                  # continue from out_dir/ckpt.pt (none there: start from scratch, and say so)
    overwrite: bool = False               # replace the run in out_dir (without it, a checkpoint there is an error)
    wandb: bool = False                   # also log to wandb (WANDB_MODE=offline works without network)
    wandb_project: str = "nanogrpo"
    run_name: str = ""
    # system
    seed: int = 0
    device: str = ""                      # "" = cuda if available, else cpu
    dtype: str = "float32"                # float32 | bfloat16 (autocast, sampling and training alike)
    compile: bool = False                 # torch.compile the training forward (and the decode step on CUDA)
    grad_ckpt: bool = False               # activation checkpointing per block
    fsdp: bool = False                    # torchrun only: FSDP2, weights/grads/AdamW state sharded over ranks
    threads: int = 0                      # torch CPU threads; 0 = torch's default
    dry_run: bool = False                 # print the memory and step-time plan (plan.py) without loading weights, exit
    gpu: str = ""                         # --dry_run only: the GPU kind to plan for (plan.GPUS; "" = h100)
    gpus: int = 0                         # --dry_run only: how many GPUs to plan for (0 = 1)


def die(msg):
    # one write per line: under torchrun every rank shares stderr, and print's two writes (text, newline) interleave
    os.write(2, f"error: {msg}\n".encode())
    sys.exit(2)


# -----------------------------------------------------------------------------
# config, distributed setup, device
from config import check_train, on_ctrl_c, parse_config, prepare_out_dir, resume, save_checkpoint  # noqa: E402
from data import (check_prompt_lengths, collate, load_preferences, load_problems, micro_batches,  # noqa: E402
                  stream)
from eval import evaluate  # noqa: E402
from loss import (dpo_loss, group_advantages, grpo_loss, informative_groups, loss_norm, sampler_mismatch,  # noqa: E402
                  seq_logp)
from model import chat_ids, from_pretrained, sampling_copy, stop_token_ids  # noqa: E402
from reward import extract_answer, math_reward  # noqa: E402
from rollout import Bf16Emulation, completion_logprobs, generate, make_compiled_decode  # noqa: E402

try:
    cfg = check_train(parse_config(Config(), sys.argv[1:]))
except (ValueError, FileNotFoundError) as e:
    die(e)
if cfg.dry_run:  # memory and step-time plan on cfg.gpus x cfg.gpu, no weights loaded; exits (2 if it cannot fit)
    import plan
    plan.main(cfg)
ddp = "RANK" in os.environ
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
if ddp:
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    # a rank may generate for an hour between collectives (a long sampler batch) while the others wait: NCCL's
    # watchdog (default 10 min) would abort them
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    # every exit (the end, die, a traceback) tears the group down first: exiting with gloo's threads alive aborts
    # ("terminate called without an active exception", SIGABRT)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    if cfg.prompts_per_update % world:
        die(f"prompts_per_update={cfg.prompts_per_update} must be a multiple of the {world} ranks")
if cfg.fsdp and not ddp:
    die("--fsdp=True shards over the ranks of torchrun: run torchrun --nproc_per_node=N train.py ...")
master = rank == 0
if cfg.threads:
    torch.set_num_threads(cfg.threads)
torch.manual_seed(cfg.seed)
random.seed(cfg.seed)
ctx = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext()
sample_ctx = {"": lambda: ctx, "float32": nullcontext, "bfloat16_emul": Bf16Emulation,
              "bfloat16": lambda: torch.autocast(device.type, dtype=torch.bfloat16)}[cfg.sample_dtype]
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
try:  # one trainer per out_dir (a lock), no checkpoint replaced unasked, no partial one left from a failed save
    lock, notes = prepare_out_dir(cfg) if master else (None, [])
except ValueError as e:
    die(e)
log_file = open(os.path.join(cfg.out_dir, "log.txt"), "a") if master else None
bar = None  # the tqdm step bar, on an interactive terminal only (in logs and CI its redraws are noise)


def print0(*args):
    if master:
        s = " ".join(str(a) for a in args)
        tqdm.write(s) if bar is not None else print(s, flush=True)  # tqdm.write redraws the bar below the line
        print(s, file=log_file, flush=True)


print0(f"config: {asdict(cfg)}")
for note in notes:
    print0(f"warning: {note}")
on_ctrl_c(cfg, ckpt_path, master, lambda: globals().get("state", {}).get("step", 0))  # exit 130, how to resume

# -----------------------------------------------------------------------------
# model, reference, data, optimizer
try:
    model, tok = from_pretrained(cfg.model, device=device)
    ref_model = None
    if cfg.algo != "grpo" or cfg.kl_coef > 0:  # DPO's pi_ref and GRPO's KL anchor: the frozen initial policy
        ref_model, _ = from_pretrained(cfg.model, device=device)
        ref_model.requires_grad_(False)
    if cfg.algo == "dpo_offline":
        train_items = load_preferences(cfg.data)
        eval_problems = load_problems(cfg.eval_data, "test", n=cfg.eval_n or None) if cfg.eval_data else []
    else:
        # a file without --eval_data: train and eval on its two sides of a fixed hash split, never on the same rows
        split = not cfg.eval_data
        train_items = load_problems(cfg.data, "train", n=cfg.train_n or None, seed=cfg.seed, holdout=split)
        eval_problems = load_problems(cfg.eval_data or cfg.data, "test", n=cfg.eval_n or None, holdout=split)
    for flag, items in (("--data", train_items), ("--eval_data", eval_problems)):  # a prompt over the context hangs
        check_prompt_lengths(items, tok, model.cfg.max_seq_len - cfg.max_new_tokens, flag)
except (ValueError, OSError) as e:
    die(e)
model.train()
model.gradient_checkpointing = cfg.grad_ckpt
train_model = torch.compile(model, dynamic=True) if cfg.compile else model  # `model` stays the raw module
decode_fn = make_compiled_decode(device) if cfg.compile and device.type == "cuda" else None
# bf16 sampling on a GPU: a bf16 copy of the policy (bf16 cache, no per-step weight casts), refreshed from the fp32
# master weights before each generation. CPUs keep autocast / Bf16Emulation; FSDP gathers bf16 weights itself
bf16_copy, sampler = device.type == "cuda" and not cfg.fsdp and (cfg.sample_dtype or cfg.dtype) == "bfloat16", None
stops = stop_token_ids(tok, model.cfg)
pad_id = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
if cfg.algo == "dpo_offline":  # a preference response ends as the chat template ends an assistant turn (Qwen base
    # models: <|im_end|>, while their tokenizer's eos, stops[0], is <|endoftext|>)
    turn = tok.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                   tokenize=True, return_dict=True)["input_ids"]
    end_of_turn = next((i for i in turn[len(chat_ids(tok, "q")):] if i in stops), stops[0])
fallbacks = tuple(cfg.fallbacks.split(","))
print0(f"model: {cfg.model} ({model.num_params() / 1e6:.1f}M params) on {device}, {world} rank(s); "
       f"{len(train_items)} training items, {len(eval_problems)} held-out problems")

fsdp_units = []
one_token = torch.zeros(1, 1, dtype=torch.long, device=device)  # FSDP's throwaway forwards (lazy init, padding)
if cfg.fsdp:  # FSDP2: one unit per block, and the root (embeddings, final norm, lm_head; the scorer calls lm_head
    # after forward, so the root stays unsharded until backward). bf16 weights in compute with --dtype=bfloat16, fp32
    # gradient reduction
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    fsdp_units = [fully_shard(block, mp_policy=mp) for block in model.layers]
    fsdp_units.append(fully_shard(model, mp_policy=mp, reshard_after_forward=False))


@contextmanager
def gathered():
    """FSDP: every rank holds the full weights inside (one all-gather per unit), and forwards make no collective, so
    the sampler, the no-grad scorer and eval may run a different number of forwards on each rank (or on rank 0
    only). Costs one full copy of the weights, freed on exit. Without FSDP: nothing."""
    for unit in fsdp_units:
        unit.unshard()
        unit.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in fsdp_units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model)


if cfg.fsdp:  # FSDP's lazy init and a first gather/reshard cycle, which re-registers the root's parameters: before
    with torch.no_grad(), gathered():  # the optimizer takes references to them
        model(one_token)


# fused: one kernel over all parameters; on the 2-core CPU 0.04 s a step for SmolLM2 vs 0.2 s for torch's default loop
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                              fused=device.type in ("cpu", "cuda") and not cfg.fsdp)  # (fused: not with DTensors)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(1.0, (it + 1) / max(1, cfg.warmup_steps)))
state = dict(step=0, data_pos=0, rollouts=0, wall=0.0, eval0=None, eval_last=None)  # everything the loop carries across steps

if cfg.resume and os.path.exists(ckpt_path):
    try:  # weights, optimizer, scheduler, RNGs; refuses a changed lr / weight_decay
        state = resume(ckpt_path, model, optimizer, scheduler, cfg)
    except ValueError as e:
        die(e)
    print0(f"resumed from {ckpt_path} at step {state['step']}")
if cfg.wandb and master:
    import wandb
    wandb.init(project=cfg.wandb_project, name=cfg.run_name or None, config=asdict(cfg), dir=cfg.out_dir)

# -----------------------------------------------------------------------------
# batches: a list of groups (k rollouts of one prompt, or one DPO pair), each group a dict of per-row lists
encode = lru_cache(maxsize=None)(lambda prompt: chat_ids(tok, prompt))  # a prompt's chat-template ids, once


def next_items(n):
    """The next n items of the training stream, as (global index, item); this rank's share (empty on some ranks when
    n < world: every caller must accept an empty list)."""
    out = stream(train_items, state["data_pos"], n, cfg.seed)
    state["data_pos"] += n
    return out[rank::world]


def all_sum(x, op=dist.ReduceOp.SUM):
    """Sum (or max, with op=dist.ReduceOp.MAX) a python number over ranks (identity on one process)."""
    if not ddp:
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=device)  # NCCL takes CUDA tensors only
    dist.all_reduce(t, op)
    return t.item()


def gather(xs):
    """Every rank's list xs, one after the other (identity on one process)."""
    if ddp:
        parts = [None] * world
        dist.all_gather_object(parts, xs)  # under NCCL through torch.cuda.current_device(), set above
        xs = [x for part in parts for x in part]
    return xs


@torch.no_grad()
def add_logp(groups, net, key):
    """Score every row's tokens with net (no grad, the trainer's dtype) into g[key]: ref_logp, or old_logp recomputed."""
    for mb in micro_batches(groups, cfg.token_budget, split_groups=cfg.algo == "grpo"):
        b = collate(mb, pad_id, device)
        with ctx:
            lp = completion_logprobs(net, b["prompt_ids"], b["prompt_mask"], b["tokens"], b["mask"],
                                     cfg.temperature if cfg.algo == "grpo" else 1.0).float().cpu()
        i = 0
        for p in mb:  # a row chunk writes into its parent group
            for j, t in enumerate(p["tokens"]):
                p.get("parent", p)[key][p.get("row0", 0) + j] = lp[i + j, :len(t)]
            i += len(p["tokens"])


def sample_groups(items, step, k):
    """k rollouts for each (index, problem) -> one group per problem, with rewards, `keep` (informative: its rewards
    differ, or a KL term gives it a gradient) and the raw rollout stats."""
    if not items:  # this rank's share of a small RS refill can be empty
        return [], dict(rewards=[], correct=[], trunc=[], lens=[])
    prompts = [encode(p["prompt"]) for _, p in items]
    seeds = [hash((cfg.seed, step, gi, j)) & 0x7FFFFFFF for gi, _ in items for j in range(k)]
    global sampler
    if bf16_copy:
        sampler = sampling_copy(model, torch.bfloat16, out=sampler)
    with nullcontext() if bf16_copy else sample_ctx():
        ro = generate(sampler if bf16_copy else model, prompts, k=k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                      stop_ids=stops, pad_id=pad_id, seed=seeds, decode_fn=decode_fn,
                      mem_budget=cfg.sample_mem_gib * 2 ** 30 or None)
    lens = ro.mask.sum(-1).long().tolist()
    toks = [ro.tokens[r, :n].tolist() for r, n in enumerate(lens)]
    texts = tok.batch_decode(toks, skip_special_tokens=True)
    trunc = [f == "length" for f in ro.finish]
    rewards = [math_reward(t, items[r // k][1]["answer"], fallbacks, truncated=tr) for r, (t, tr) in enumerate(zip(texts, trunc))]
    correct = [math_reward(t, items[r // k][1]["answer"], fallbacks) for r, t in enumerate(texts)]  # ignores truncation
    keep = informative_groups(torch.tensor(rewards), k).tolist()
    groups = [dict(idx=gi, prompt=prompts[i], tokens=toks[i * k:(i + 1) * k], texts=texts[i * k:(i + 1) * k],
                   sampler_logp=[ro.logp[r, :lens[r]].float().cpu() for r in range(i * k, (i + 1) * k)],
                   rewards=rewards[i * k:(i + 1) * k], answer=p["answer"],
                   keep=keep[i] or (cfg.algo == "grpo" and cfg.kl_coef > 0)) for i, (gi, p) in enumerate(items)]
    stats = dict(rewards=rewards, correct=correct, trunc=trunc, lens=lens)
    return groups, stats


def online_batch(step):
    """GRPO-k / 2-GRPO(+RS) / online DPO: sample, score, keep informative groups (all with norm_dropped), set
    advantages. Returns this rank's groups."""
    k = cfg.k
    groups, stats = sample_groups(next_items(cfg.prompts_per_step), step, k)
    rollouts = all_sum(len(groups) * k)
    while cfg.resample:  # 2-GRPO+RS: refill dropped groups with fresh prompts, within 16-GRPO's rollout budget
        missing = cfg.prompts_per_step - int(all_sum(sum(g["keep"] for g in groups)))
        if missing <= 0 or rollouts + missing * k > cfg.prompts_per_step * cfg.rs_max_k:
            break
        more, more_stats = sample_groups(next_items(missing), step, k)
        groups += more
        rollouts += all_sum(len(more) * k)
        stats = {key: stats[key] + more_stats[key] for key in stats}
    stats.update(n_groups=len(groups), rollouts=rollouts, answers=[extract_answer(t, fallbacks) for g in groups
                                                                   for t in g["texts"]])  # the log's top answer
    groups = [g for g in groups if g["keep"] or cfg.norm_dropped]
    std = None
    if cfg.adv_scale == "batch":  # the std of every reward sampled this step, all ranks (TRL's scale_rewards="batch")
        n, s1, s2 = (all_sum(sum(x ** p for x in stats["rewards"])) for p in (0, 1, 2))
        std = max(s2 - s1 * s1 / n, 0.0) ** 0.5 / max(n - cfg.adv_unbiased, 1) ** 0.5
    for g in groups:
        r = torch.tensor(g["rewards"])
        g["old_logp"] = list(g["sampler_logp"])  # a copy: rewritten by add_logp with --old_logp=recompute
        if cfg.algo == "grpo":
            g["adv"] = group_advantages(r, k, scale=cfg.adv_scale, unbiased=cfg.adv_unbiased, batch_std=std).tolist()
        else:  # online DPO: order the pair (chosen, rejected)
            order = [0, 1] if r[0] > r[1] else [1, 0]
            for key in ("tokens", "texts", "old_logp", "sampler_logp", "rewards"):
                g[key] = [g[key][i] for i in order]
            g["adv"] = [0.0, 0.0]
        g["ref_logp"] = [torch.zeros(len(t)) for t in g["tokens"]]
    if ref_model is not None:
        add_logp([g for g in groups if g["keep"]], ref_model, "ref_logp")
    return groups, stats


def offline_batch(step):
    """Offline DPO: the next prompts_per_step preference pairs from the jsonl."""
    groups = []
    for gi, it in next_items(cfg.prompts_per_step):
        pair = [tok(t, add_special_tokens=False)["input_ids"][:cfg.max_new_tokens - 1] + [end_of_turn]
                for t in (it["chosen"], it["rejected"])]
        groups.append(dict(idx=gi, keep=True, prompt=encode(it["prompt"]), tokens=pair, texts=[it["chosen"], it["rejected"]],
                           old_logp=[torch.zeros(len(t)) for t in pair], ref_logp=[torch.zeros(len(t)) for t in pair],
                           sampler_logp=[torch.zeros(len(t)) for t in pair],
                           adv=[0.0, 0.0], rewards=[1.0, 0.0], answer=""))
    add_logp(groups, ref_model, "ref_logp")
    lens = [len(t) for g in groups for t in g["tokens"]]
    return groups, dict(rewards=[], correct=[], trunc=[], lens=lens, n_groups=len(groups), rollouts=0)


def compute_loss(b, norm, first):
    """Loss of one micro-batch, already divided by the mini-batch normaliser `norm` (summed over ranks).
    first: before the step's first update (the trainer is still the sampling policy): measure the mismatch."""
    with ctx:
        # FSDP: the plain path, one forward a micro-batch (the shared path's forward count differs between ranks)
        logp, ent = completion_logprobs(train_model, b["prompt_ids"], b["prompt_mask"], b["tokens"], b["mask"],
                                        cfg.temperature if cfg.algo == "grpo" else 1.0, entropy=True,
                                        share_prompts=not cfg.fsdp)
    logp = logp.float()
    if cfg.algo == "grpo":
        loss, m = grpo_loss(logp, b["old_logp"], b["adv"], b["mask"], cfg.clip_low, cfg.clip_high, cfg.agg, norm,
                            cfg.max_new_tokens, b["ref_logp"] if cfg.kl_coef > 0 else None, cfg.kl_coef,
                            cfg.dual_clip, b["sampler_logp"], cfg.tis_cap)
        if first:  # 0 by construction with fp32 sampling and the sampler's old_logp
            m.update(sampler_mismatch(b["sampler_logp"], logp.detach(), b["mask"]))
    else:  # rows alternate chosen, rejected; DPO compares summed sequence log-probs (Eq. 9)
        s, ref = seq_logp(logp, b["mask"]), seq_logp(b["ref_logp"], b["mask"])
        loss, m = dpo_loss(s[0::2], s[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.label_smoothing, cfg.ipo)
        loss = loss * (s.numel() // 2) / norm  # mean over this micro-batch's pairs -> share of the mini-batch
    m["entropy"] = (ent * b["mask"]).sum() / b["mask"].sum().clamp(min=1)
    return loss, {key: float(v) for key, v in m.items()}


get_batch = offline_batch if cfg.algo == "dpo_offline" else online_batch  # the algorithm is chosen once, here

# -----------------------------------------------------------------------------
# the loop
n_updates = cfg.prompts_per_step // cfg.prompts_per_update
start = state["step"]
idle = 0  # steps in a row without an optimizer update
if master and sys.stderr.isatty():
    bar = tqdm(total=cfg.num_steps, initial=start, unit="step", dynamic_ncols=True)
for step in range(start, cfg.num_steps + 1):
    last_step = step == cfg.num_steps
    if eval_problems and (last_step or (cfg.eval_every and step % cfg.eval_every == 0)) and not (step == start and start):
        model.eval()
        with gathered(), ctx:  # each rank evaluates its share of the problems (FSDP: on gathered weights)
            res = evaluate(model, tok, eval_problems, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                           fallbacks=fallbacks, seed=cfg.seed, shard=(rank, world))
        model.train()
        state["eval0"] = res["acc"] if step == 0 else state["eval0"]  # "before": only a step-0 eval
        state["eval_last"] = res["acc"]
        print0(f"eval step {step:04d} | held-out greedy acc {res['acc']:.4f} | trunc {res['trunc']:.3f} | "
               f"len {res['len']:.1f} | {len(eval_problems)} problems")
        if cfg.wandb and master:
            wandb.log({"eval/acc": res["acc"], "eval/trunc": res["trunc"], "eval/len": res["len"]}, step=step)
    if (master or cfg.fsdp) and step > start and (last_step or (cfg.save_every and step % cfg.save_every == 0)):
        try:  # atomic; FSDP: every rank joins the gather, rank 0 writes
            save_checkpoint(ckpt_path, model, optimizer, scheduler, state, cfg, master)
        except ValueError as e:
            die(e)
    if last_step:
        break

    # ---- rollouts, rewards, advantages
    t0 = time.time()
    model.eval()
    with gathered():
        groups, stats = get_batch(step)
    # the global list in prompt order, the same on every rank: each rank then splits it as one process would
    groups = sorted(gather(groups), key=lambda g: g["idx"])
    model.train()
    sync()
    t1 = time.time()

    # ---- updates: one optimizer step per mini-batch, gradient accumulation over micro-batches
    mets = []
    gnorm = 0.0
    # split the global list as one process would, then give each rank a shard: DDP does not change the update
    minis = [groups[u * len(groups) // n_updates:(u + 1) * len(groups) // n_updates] for u in range(n_updates)]
    shards = [[g for g in mb if g["keep"]][rank::world] for mb in minis]
    if cfg.old_logp == "recompute":  # pi_old from the trainer's own forward, micro-batched as the updates below
        with gathered():
            for shard in shards:
                add_logp(shard, train_model, "old_logp")
    updated = False  # the mismatch is measured before the step's first update, while the trainer is the sampler's policy
    for u, mb in enumerate(minis):
        if not any(g["keep"] for g in mb):
            continue  # every group of this mini-batch was dropped: nothing to learn from (same on every rank)
        # the loss divisor of the whole mini-batch, which every rank holds: its pairs (DPO, a mean over pairs) or
        # loss_norm of its rows (dropped groups are among mb only with norm_dropped, loss.py item 4)
        norm = len(mb) if cfg.algo != "grpo" else loss_norm(collate(mb, pad_id, device)["mask"], cfg.agg,
                                                             cfg.max_new_tokens)
        micros = micro_batches(shards[u], cfg.token_budget, split_groups=cfg.algo == "grpo")
        # FSDP reduce-scatters in every backward: each rank runs as many as the busiest one (extras: a zero loss)
        for i in range(int(all_sum(len(micros), dist.ReduceOp.MAX)) if cfg.fsdp else len(micros)):
            if i < len(micros):
                loss, m = compute_loss(collate(micros[i], pad_id, device), norm, not updated)
                mets.append(m)
            else:
                loss = model(one_token).sum() * 0
            loss.backward()
        # each rank's loss is already divided by the global normaliser, so gradients are summed over ranks
        if cfg.fsdp:  # FSDP averaged the shards' gradients over ranks: back to the sum
            for p in model.parameters():
                p.grad.mul_(world)
        elif ddp:  # a rank with an empty shard joins with zeros. One all-reduce per tensor: on 2 gloo ranks
            # (dev/bench_sync.py) it was not slower than flattened buckets or the DDP wrapper, which also assumes one
            # forward per backward
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        updated = True
    sync()
    t2 = time.time()

    # ---- logging
    state["step"] = step + 1
    state["rollouts"] += stats["rollouts"]
    state["wall"] += t2 - t0
    # every logged number is over all ranks; metrics are averaged over the micro-batches that have them
    avg = lambda key: all_sum(sum(m[key] for m in mets if key in m)) / max(1, all_sum(sum(key in m for m in mets)))
    mean = lambda xs: all_sum(sum(xs)) / max(1, all_sum(len(xs)))
    mm_max = all_sum(max([m["mismatch_max"] for m in mets if "mismatch_max" in m], default=0.0), dist.ReduceOp.MAX)
    log = dict(reward=mean(stats["rewards"]), acc=mean(stats["correct"]), trunc=mean(stats["trunc"]),
               len=mean(stats["lens"]), zero_var=1 - sum(g["keep"] for g in groups) / max(1, all_sum(stats["n_groups"])),
               clip_low=avg("clipfrac_low"), clip_high=avg("clipfrac_high"), kl=avg("approx_kl"), kl_ref=avg("kl_ref"),
               clip_dual=avg("clipfrac_dual"), tis=avg("tis_mean"), tis_capped=avg("tis_capped"),
               mismatch=avg("mismatch_mean"), mismatch_max=mm_max, mismatch_k3=avg("mismatch_k3"),
               entropy=avg("entropy"), dpo_acc=avg("reward_acc"), margin=avg("reward_margin"), gnorm=gnorm,
               lr=scheduler.get_last_lr()[0], roll_s=t1 - t0, train_s=t2 - t1,
               tok_s=all_sum(sum(stats["lens"])) / max(t1 - t0, 1e-9), rollouts=state["rollouts"],
               wall_min=state["wall"] / 60)
    shown = ["reward", "acc", "zero_var", "trunc", "len"] + (
        ["clip_low", "clip_high", "kl", "entropy"] if cfg.algo == "grpo" else ["dpo_acc", "margin", "entropy"])
    shown += (["clip_dual"] if cfg.dual_clip else []) + (["tis", "tis_capped"] if cfg.tis_cap else [])
    # sampler vs trainer log-probs on the first mini-batch: |diff| mean and max, k3 KL(sampler || trainer)
    mism = f" | mismatch {log['mismatch']:.1e} max {mm_max:.1e} k3 {log['mismatch_k3']:.1e}" if cfg.algo == "grpo" else ""
    answers = gather(stats.get("answers", []))  # the top answer and its share: a collapse onto one shows here
    top, n_top = Counter(answers).most_common(1)[0] if answers else (None, 0)
    log["top_share"] = n_top / max(1, len(answers))
    top = f" | top {'none' if top is None else repr(top[:20])} {log['top_share']:.2f}" if answers else ""
    print0(f"step {step:04d}/{cfg.num_steps:04d} | " + " | ".join(f"{key} {log[key]:.3f}" for key in shown) + top +
           mism + f" | gnorm {gnorm:.2f} | lr {log['lr']:.1e} | roll {log['roll_s']:.1f}s | "
           f"train {log['train_s']:.1f}s | tok/s {log['tok_s']:.0f} | rollouts {state['rollouts']} | "
           f"{log['wall_min']:.1f} min")
    if cfg.wandb and master:
        wandb.log({f"train/{key}": v for key, v in log.items()}, step=step)
    if bar is not None:
        bar.update(1)
        bar.set_postfix(reward=f"{log['reward']:.3f}", zero_var=f"{log['zero_var']:.2f}", refresh=False)
    idle = 0 if updated else idle + 1
    if idle == 3 or (idle and idle % 10 == 0):
        print0(f"warning: no update in the last {idle} steps: every group's rollouts had equal rewards (zero_var 1); "
               "check the answers the model gives (top), --fallbacks, --temperature and --max_new_tokens (trunc)")
    if cfg.sample_every and step % cfg.sample_every == 0 and groups:
        for g in [g for g in groups if g["keep"]][:2]:
            print0(f"  sample | answer {g['answer']} | rewards {g['rewards']} | {g['texts'][0][:300]!r}")

if bar is not None:
    bar.close()
    bar = None
if idle and idle == cfg.num_steps - start:
    print0(f"warning: this run made no update in any of its {idle} steps: the model is unchanged")
if state["eval_last"] is not None:
    e0, e1 = state["eval0"], state["eval_last"]
    change = f"{100 * e0:.1f}% -> {100 * e1:.1f}% ({100 * (e1 - e0):+.1f} points)" if e0 is not None else \
        f"{100 * e1:.1f}% (no step-0 eval to compare with)"
    print0(f"held-out greedy accuracy: {change} in {state['wall'] / 60:.1f} min of training, {state['rollouts']} rollouts")
if cfg.wandb and master:
    wandb.finish()
if ddp:  # every rank past its last collective before any tears its connections down (atexit destroys the group)
    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
