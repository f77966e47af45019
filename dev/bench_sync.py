"""
Gradient sync over ranks, side by side on the same model and batch: one all-reduce per parameter tensor (what
train.py does), flattened buckets, and PyTorch's DDP wrapper (buckets, overlapped with backward). Results: dev/perf.md.
The hand syncs are timed alone (median over --reps, on the gradients of one backward); the DDP wrapper's sync cannot
be timed apart from its backward, so its row is (forward + backward + sync) minus plain forward + backward, the two
timed alternately.

    torchrun --nproc_per_node=2 dev/bench_sync.py                    # SmolLM2-135M shape, random weights, gloo on CPU
    torchrun --nproc_per_node=2 dev/bench_sync.py --layers=4 --reps=3
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402

args = dict(a.removeprefix("--").split("=") for a in sys.argv[1:])
layers, reps, T = int(args.get("layers", 30)), int(args.get("reps", 5)), int(args.get("tokens", 64))
torch.set_num_threads(int(args.get("threads", 1)))
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = Transformer(ModelConfig(n_layers=layers)).to(device)
params = list(model.parameters())
ids = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(rank)).to(device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def per_tensor():
    for p in params:
        dist.all_reduce(p.grad)


def bucketed(mb):
    def run():
        bucket, size = [], 0
        for i, p in enumerate(params):
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= mb << 20 or i == len(params) - 1:
                flat = torch.cat([g.flatten() for g in bucket])
                dist.all_reduce(flat)
                for g, f in zip(bucket, flat.split([g.numel() for g in bucket])):
                    g.copy_(f.view_as(g))
                bucket, size = [], 0
    return run


def fwd_bwd(fwd):
    for p in params:
        p.grad = None
    dist.barrier()
    sync()
    t0 = time.perf_counter()
    fwd(ids).float().logsumexp(-1).mean().backward()
    sync()
    return time.perf_counter() - t0


def timed_sync(run):
    out = []
    for _ in range(reps + 1):  # the first is a warm-up
        dist.barrier()
        t0 = time.perf_counter()
        run()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out[1:])


fwd_bwd(model)  # gradients to sync, and a warm-up
rows = [("per-tensor all_reduce", timed_sync(per_tensor))]
rows += [(f"buckets of {mb} MB", timed_sync(bucketed(mb))) for mb in (25, 100)]
ddp = DDP(model, bucket_cap_mb=25)
fwd_bwd(ddp)
pairs = [(fwd_bwd(model), fwd_bwd(ddp)) for _ in range(reps)]
base, with_ddp = statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs)
if rank == 0:
    n = sum(p.numel() for p in params)
    print(f"{world} ranks on {device}, {n / 1e6:.1f}M params ({4 * n / 2**20:.0f} MB of fp32 grads), {layers} layers, "
          f"{len(params)} tensors, batch 2 x {T} tokens, {torch.get_num_threads()} thread(s) a rank, median of {reps}")
    for name, t in rows:
        print(f"  {name:24s} sync {t:.3f} s")
    print(f"  DDP wrapper (25 MB)      forward + backward + sync {with_ddp:.3f} s vs {base:.3f} s without sync: "
          f"{with_ddp - base:+.3f} s")
dist.destroy_process_group()
