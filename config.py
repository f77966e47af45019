"""
The run's config and files, for train.py and eval.py: `python train.py [configs/x.py ...] [--key=value ...]`, the
checks across keys, and the files (one trainer per out_dir, no silent overwrite, atomic writes, checkpoints saved,
loaded safely and resumed, Ctrl-C's note on how to go on).

A config file is plain Python assignments (`k = 16`, `lr = 1e-6`); `--key=value` is parsed with ast.literal_eval,
falling back to the raw string for str fields. Unknown keys and wrong types are errors that name the closest valid key.
`--help` lists every key with its value and its comment, grouped by the dataclass's `# section` lines.
"""
import ast
import contextlib
import difflib
import errno
import fcntl
import inspect
import io
import os
import random
import shlex
import signal
import socket
import sys
import textwrap
import time
import tokenize
import zipfile
from dataclasses import asdict, fields

import torch

# names other frameworks (TRL, verl, HF) use, so a misspelled or foreign key still points at ours
ALIASES = {"learning_rate": "lr", "num_generations": "k", "group_size": "k", "rollout_n": "k", "max_steps": "num_steps",
           "max_completion_length": "max_new_tokens", "train_batch_size": "prompts_per_step",
           "ppo_mini_batch_size": "prompts_per_update", "epsilon": "clip_low", "epsilon_high": "clip_high"}


def _coerce(name, value, typ, where):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # `lr = 1` is fine for a float field
    if typ is str and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {name} must be {typ.__name__}, got {value!r}")
    return value


def _check_key(cfg, name, where):
    names = [f.name for f in fields(cfg)]
    if name not in names:
        close = difflib.get_close_matches(name, names + [a for a in ALIASES if ALIASES[a] in names], n=1)
        hint = f"; did you mean {ALIASES.get(close[0], close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ValueError(f"{where}: unknown config key {name!r}{hint}")
    return {f.name: f.type for f in fields(cfg)}[name]


def parse_config(cfg, argv):
    """Apply config files and --key=value overrides from argv to the dataclass instance cfg, in order. Returns cfg."""
    for arg in argv:
        if arg in ("-h", "--help"):  # the dataclass is the documentation
            print_help(cfg)
            raise SystemExit(0)
        if arg.startswith("--"):
            name, eq, raw = arg[2:].partition("=")
            name = name.replace("-", "_")
            typ = _check_key(cfg, name, arg)
            typ = typ if isinstance(typ, type) else eval(typ)  # annotations may be strings  # noqa: S307 (our own code)
            if not eq:
                if typ is not bool:
                    raise ValueError(f"{arg}: expected --{name}=VALUE")
                raw = "True"  # --resume alone means --resume=True
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                if typ is not str:
                    raise ValueError(f"{arg}: cannot parse {raw!r} as {typ.__name__}") from None
                value = raw
            setattr(cfg, name, _coerce(name, value, typ, arg))
        else:
            try:
                with open(arg) as f:
                    src = f.read()
            except OSError as e:
                raise FileNotFoundError(f"config file {arg!r}: {e.strerror}") from None
            scope = {}
            try:
                exec(compile(src, arg, "exec"), {}, scope)  # a config file is code the user wrote, like nanoGPT's
            except Exception as e:
                raise ValueError(f"config file {arg}: {type(e).__name__}: {e}") from None
            for name, value in scope.items():
                if name.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                typ = _check_key(cfg, name, arg)
                typ = typ if isinstance(typ, type) else eval(typ)  # noqa: S307
                setattr(cfg, name, _coerce(name, value, typ, arg))
    return cfg


def print_help(cfg):
    """Every key with its value and its `#` comment (continued on comment-only lines below it), grouped under the
    dataclass's `# section` lines: read from the class's source, so the help cannot drift from the code."""
    try:
        src = textwrap.dedent(inspect.getsource(type(cfg)))
    except (OSError, TypeError):  # no source file (python -c): the keys without comments
        src = "class C:\n" + "".join(f"    {f.name}: int = 0\n" for f in fields(cfg))
    comments = {t.start[0]: (t.start[1], t.string.lstrip("# ").rstrip())
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    rows = {n.lineno: n.target.id for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)}
    groups, last = [["", []]], None
    for line in range(1, src.count("\n") + 2):
        if line in rows:
            last = [f"--{rows[line]}={getattr(cfg, rows[line])!r}", comments.get(line, (0, ""))[1]]
            groups[-1][1].append(last)
        elif line in comments and last is not None and comments[line][0] > 4:  # a field's comment goes on
            last[1] += " " + comments[line][1]
        elif line in comments:  # a section
            groups.append([comments[line][1], []])
            last = None
    width = max(len(key) for _, keys in groups for key, _ in keys) + 2
    print(f"usage: python {os.path.basename(sys.argv[0])} [config files of key = value lines] [--key=value ...]")
    for title, keys in groups:
        if keys:
            print(f"\n{title}:" if title else "")
            for key, comment in keys:
                pad = " " * (width + 2)
                print(textwrap.fill(comment, 118, initial_indent=f"  {key:<{width}}", subsequent_indent=pad)
                      if comment else f"  {key}")


def check_train(cfg):
    """train.py's checks across keys, and the values with which a run can never learn. Returns cfg; raises ValueError
    with one line."""
    if cfg.algo not in ("grpo", "dpo", "dpo_offline"):
        raise ValueError(f"--algo={cfg.algo}: expected grpo, dpo or dpo_offline")
    for key, ok in [("adv_scale", ("std", "batch", "none")), ("agg", ("seq_mean", "token_mean", "const")),
                    ("old_logp", ("sampler", "recompute")), ("dtype", ("float32", "bfloat16")),
                    ("sample_dtype", ("", "float32", "bfloat16", "bfloat16_emul"))]:
        if getattr(cfg, key) not in ok:
            raise ValueError(f"--{key}={getattr(cfg, key)!r}: expected one of {', '.join(map(repr, ok))}")
    for key in ("k", "prompts_per_step", "prompts_per_update", "token_budget", "max_new_tokens", "num_steps", "lr",
                "beta", "rs_max_k"):
        if getattr(cfg, key) <= 0:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be > 0" + (
                "; to evaluate a model without training it, run eval.py" if key in ("num_steps", "lr") else ""))
    for key in ("warmup_steps", "weight_decay", "grad_clip", "kl_coef", "clip_low", "clip_high", "label_smoothing",
                "eval_every", "eval_n", "sample_every", "save_every", "threads", "gpus"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"--{key}={getattr(cfg, key)}: must be >= 0")
    if cfg.algo != "dpo_offline" and cfg.k == 1:
        raise ValueError("--k=1: one rollout per prompt has no group to compare with, so every group is dropped and "
                         "no step updates the model; use --k=2 (2-GRPO) or more")
    if cfg.algo != "dpo_offline" and cfg.temperature <= 0:
        raise ValueError(f"--temperature={cfg.temperature}: greedy rollouts of one prompt are identical, so no group "
                         "has a reward to compare and no step updates the model; sample with a temperature > 0")
    if cfg.algo == "dpo" and cfg.k != 2:
        raise ValueError(f"--k={cfg.k}: online DPO samples 2 rollouts per prompt; set --k=2")
    if cfg.prompts_per_step % cfg.prompts_per_update:
        raise ValueError(f"prompts_per_step={cfg.prompts_per_step} must be a multiple of "
                         f"prompts_per_update={cfg.prompts_per_update}")
    if cfg.resample and cfg.algo == "grpo" and cfg.kl_coef > 0:
        raise ValueError("--resample=True with --kl_coef>0: with a KL term no group is dropped, so RS would refill "
                         "nothing; use one or the other")
    if cfg.norm_dropped and (cfg.resample or cfg.algo == "dpo_offline" or (cfg.algo == "grpo" and cfg.kl_coef > 0)):
        raise ValueError("--norm_dropped=True counts dropped groups, but with --resample they are refilled and with "
                         "dpo_offline or --kl_coef>0 none are dropped; drop --norm_dropped")
    if cfg.train_n < 0 or (cfg.train_n and cfg.algo == "dpo_offline"):
        raise ValueError(f"--train_n={cfg.train_n}: a number of training problems >= 0 (0 = all); dpo_offline reads "
                         "every preference pair, drop --train_n there")
    if (cfg.gpu or cfg.gpus) and not cfg.dry_run:
        raise ValueError("--gpu/--gpus describe the GPUs --dry_run plans for; to train on N GPUs run "
                         "torchrun --nproc_per_node=N train.py")
    if cfg.tis_cap < 0 or (cfg.tis_cap > 0 and cfg.old_logp != "recompute"):
        raise ValueError(f"--tis_cap={cfg.tis_cap}: a cap >= 0 (0 = off), with --old_logp=recompute (with the "
                         "sampler's log-probs as old_logp the TIS weight is 1)")
    if cfg.sample_mem_gib < 0:
        raise ValueError(f"--sample_mem_gib={cfg.sample_mem_gib}: a budget in GiB > 0, or 0 for no chunking")
    if cfg.dual_clip != 0 and cfg.dual_clip <= 1:
        raise ValueError(f"--dual_clip={cfg.dual_clip}: 0 (off) or a cap c > 1 (verl uses 3)")
    if cfg.algo != "grpo" and (cfg.tis_cap or cfg.dual_clip or cfg.old_logp != "sampler"):
        raise ValueError(f"--algo={cfg.algo}: --tis_cap, --dual_clip and --old_logp=recompute are GRPO options")
    if cfg.algo == "dpo_offline" and cfg.sample_dtype:
        raise ValueError(f"--sample_dtype={cfg.sample_dtype}: dpo_offline samples nothing; drop it")
    if cfg.fsdp and cfg.dtype == "bfloat16" and cfg.sample_dtype in ("float32", "bfloat16_emul"):
        raise ValueError(f"--sample_dtype={cfg.sample_dtype} with --fsdp --dtype=bfloat16: FSDP gathers the weights "
                         "in bf16, so the sampler cannot run in fp32; use --dtype=float32 or drop --sample_dtype")
    if cfg.fsdp and cfg.compile:
        raise ValueError("--fsdp=True with --compile=True (FSDP's gathered weights under the compiled decode and "
                         "training forward: never tested); add --compile=False")
    return cfg

# -----------------------------------------------------------------------------
# the run's files


def lock_dir(path):
    """An exclusive lock on path/lock for the life of this process (the kernel drops it when the process dies, so a
    lock left by a killed run is taken over). Returns the open lock file; raises ValueError naming the holder."""
    f = open(os.path.join(path, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{path} is in use by {holder}: wait for that run to end, or pick another --out_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def prepare_out_dir(cfg):
    """train.py's out_dir: create it, lock it (one trainer per out_dir), remove a partial checkpoint a failed save left,
    refuse to replace a checkpoint unless --resume or --overwrite says what to do with it. Returns (lock, notes to
    print); raises ValueError with one line."""
    d, notes = cfg.out_dir, []
    if os.path.exists(d) and not os.path.isdir(d):
        raise ValueError(f"--out_dir={d} is a file, not a directory; pick another --out_dir")
    try:
        os.makedirs(d, exist_ok=True)
        lock = lock_dir(d)
    except OSError as e:
        raise ValueError(f"--out_dir={d}: cannot write there ({e.strerror}); pick a writable --out_dir") from None
    ckpt = os.path.join(d, "ckpt.pt")
    if os.path.exists(ckpt + ".tmp"):  # ours to delete: we hold the lock, so no save is under way
        notes.append(f"removed {ckpt}.tmp ({os.path.getsize(ckpt + '.tmp') / 1e6:.0f} MB), left by a save that did "
                     "not finish")
        os.remove(ckpt + ".tmp")
    if os.path.exists(ckpt) and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"{ckpt} holds a run: continue it with --resume, start a new one in another --out_dir, "
                             "or replace it with --overwrite=True")
        for name in ("ckpt.pt", "log.txt"):
            if os.path.exists(os.path.join(d, name)):
                os.remove(os.path.join(d, name))
        notes.append(f"--overwrite: removed the previous run's ckpt.pt and log.txt in {d}")
    if cfg.resume and not os.path.exists(ckpt):
        notes.append(f"--resume: there is no checkpoint at {ckpt}; starting from scratch")
    return lock, notes


def check_out_file(path, flag="--out"):
    """Fail before the work, not after it: path must not be a directory, and its nearest existing folder must be a
    writable directory. Raises ValueError with one line."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a directory; name a file, e.g. {os.path.join(path, 'eval.json')}")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise ValueError(f"{flag}={path}: cannot write under {d}; pick another {flag}")


def atomic_write(path, write):
    """write(f) into path.tmp, fsync, rename over path: a crash or a full disk leaves the previous file intact and no
    .tmp behind. A full disk raises OSError(ENOSPC, "no space left on <folder> ...")."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C included
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on {os.path.dirname(os.path.abspath(path))} (writing {path}; "
                                   "the previous file is unchanged)") from None
        raise

# -----------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path):
    """torch.load(weights_only=True): tensors, numbers, strings, lists, tuples and dicts only, which is all a training
    checkpoint holds, so a file from someone else cannot run code while loading. Raises ValueError with one line.
    Every tensor lands on the CPU, whatever device wrote it (torch.set_rng_state takes only a CPU ByteTensor)."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: anything else is not a checkpoint of ours
        what = "an empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 else "not a torch.save archive"
        raise ValueError(f"{path} is not a checkpoint ({what}): corrupt, truncated, or not written by train.py")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no second copy in RAM
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()] or [""]
        if "Weights only load failed" in lines[0]:  # torch's message: the offending line names the python object
            why = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1]).strip()
            raise ValueError(f"{path}: refused to load, it holds python objects that could run code ({why[:200]}); "
                             "a checkpoint may hold only tensors, numbers, strings, lists and dicts") from None
        raise ValueError(f"{path}: corrupt or not a checkpoint ({type(e).__name__}: {lines[0][:200]})") from None


def save_checkpoint(path, model, optimizer, scheduler, state, cfg, master):
    """torch.save to a temp file, fsync, then rename: a crash mid-save leaves the previous ckpt.pt intact. FSDP: every
    rank joins the gather of full tensors, rank 0 writes the same layout as one process (FQN-keyed optimizer state).
    Raises ValueError with one line (a full disk)."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    else:
        model_sd, optim_sd = model.state_dict(), optimizer.state_dict()
    if not master:
        return
    ckpt = dict(model=model_sd, optimizer=optim_sd, scheduler=scheduler.state_dict(),
                state=state, rng=dict(torch=torch.get_rng_state(), python=random.getstate()), config=asdict(cfg))
    # no CUDA RNG state: nothing draws from it (sampling noise comes from per-row CPU generators, rollout.py)
    try:
        atomic_write(path, lambda f: torch.save(ckpt, f))
    except OSError as e:
        raise ValueError(f"cannot save {path}: {e.strerror}; fix that, then continue from it with --resume") from None


def resume(path, model, optimizer, scheduler, cfg):
    """Load path into model, optimizer and scheduler, restore the RNGs; returns the loop's state. Raises ValueError
    with one line: an unreadable checkpoint, or a changed lr / weight_decay."""
    try:
        # onto the CPU (mmap: pages shared, no copy), then into place: RNG states stay CPU byte tensors, and with FSDP
        # each rank moves one full tensor at a time to its GPU and keeps its shard. weights_only: it cannot run code
        ckpt = load_checkpoint(path)
        if ckpt.get("config", {}).get("fsdp", False) != cfg.fsdp:  # the optimizer state is keyed differently
            raise ValueError(f"written with --fsdp={not cfg.fsdp}; resume with that setting")
        if cfg.fsdp:  # full tensors in the file, each rank keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
            set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state = ckpt["state"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        random.setstate(ckpt["rng"]["python"])
    except Exception as e:  # one line: load_checkpoint's own message, or the first line of torch's
        why = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot resume from {path} ({type(e).__name__}: {why}); delete it to start over, or restore "
                         "a backup") from None
    # the optimizer's state restores its own lr and weight decay: a changed value would be silently ignored
    changed = [f"--{key}={getattr(cfg, key)} (checkpoint: {v})" for key, v in ckpt.get("config", {}).items()
               if key in ("lr", "weight_decay") and v != getattr(cfg, key)]
    if changed:
        raise ValueError(f"--resume from {path} with {', '.join(changed)}: the restored optimizer would keep the "
                         "checkpoint's value; resume with it, or start a new out_dir")
    del ckpt  # the loaded copies live on in model and optimizer: keeping the file's tensors doubles the memory
    return state


def on_ctrl_c(cfg, ckpt_path, master, steps_done):
    """Ctrl-C: where the run stopped (steps_done()) and how to go on; exit 130 (128 + SIGINT), no stack trace."""
    def handler(*_):
        if master:  # a ckpt.pt in out_dir is this run's (prepare_out_dir refused or removed any other)
            again = shlex.join(["python"] + sys.argv + ["--resume"] * (not cfg.resume))
            print(f"\ninterrupted after step {steps_done()} of {cfg.num_steps}; " +
                  (f"continue from {ckpt_path} with: {again}" if os.path.exists(ckpt_path) else
                   "no checkpoint written yet (--save_every=N saves every N steps)"), file=sys.stderr, flush=True)
        raise SystemExit(130)
    signal.signal(signal.SIGINT, handler)
