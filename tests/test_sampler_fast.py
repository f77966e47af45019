"""The sampler's fast path on CPU: cache writes in place (no cache-sized buffer in the compiled step), bounded compiled
shapes, continuous batching (utilisation on a paper-like length distribution, with stop times forced per row), the
same tokens and log-probs as an uncached per-row reference whatever the slots / refill order / buckets, RoPE in fp32
and a bf16 sampling copy. Run: python -m pytest -q tests/test_sampler_fast.py"""
import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import rollout
from conftest import chat_ids
from model import KVCache, Transformer, from_pretrained, rope_inv_freq, sampling_copy
from rollout import decode_step, generate, sample


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))


def row_bytes(model, S):
    cfg = model.cfg
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * S * 4


def test_compiled_step_allocates_no_cache_sized_buffer(tiny):
    """Inductor's code for one decode step holds no buffer of a layer's cache size: the write is one index_put_ on
    the base buffer, re-inplaced. With index_copy_ on a view (old main) each layer copied its cache (4 x 2 x 128 x 16)."""
    from torch._inductor.utils import run_and_get_code
    model, _ = tiny
    cfg, B, S = model.cfg, 4, 128
    cache = KVCache(cfg, B, S, "cpu", torch.float32)
    torch._dynamo.reset()
    step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    with torch.no_grad():
        _, code = run_and_get_code(step, model, torch.full((B,), 7), torch.full((B,), 5),
                                   torch.ones(B, S, dtype=torch.bool), cache, torch.arange(B) + 5, torch.rand(B),
                                   torch.zeros(B, dtype=torch.bool), torch.tensor([2]), 0, 1.0, 0, 1.0)
    shapes = re.findall(r"empty_strided_cpu\(\(([\d, ]+)\)", "\n".join(code))
    sizes = [[int(x) for x in s.split(",") if x.strip()] for s in shapes]
    assert sizes, "no buffers found: the generated code's format changed"
    layer = B * cfg.n_kv_heads * S * cfg.head_dim
    big = [s for s in sizes if torch.Size(s).numel() >= layer]
    assert not big, big
    assert cache.k[:, :, :, 5:9].abs().sum() > 0  # the step wrote the cache in place


def test_compiled_shapes_are_bounded():
    """A 16-GRPO step (10 prompts x 16 rows through 16 slots) and 20 steps of 2-GRPO with drifting prompt lengths and
    prompt counts: 22 generate calls over 21 distinct (rows, prompt length) pairs compile at most 4 graphs (rows a
    power of two, cache width a multiple of 256), never dynamo's recompile limit (8). Old main: one graph per
    (rows, width) and FailOnRecompileLimitHit at the 9th."""
    from conftest import make_tiny
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model, _ = from_pretrained(make_tiny(d, "llama"))
    torch._dynamo.reset()
    counters.clear()
    fn = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(0)
    prompt = lambda n: torch.randint(3, 250, (n,), generator=g).tolist()
    stats, combos = {}, set()
    calls = [(16, [prompt(10 + 3 * i) for i in range(10)], 16)]  # (k, prompts, slots)
    calls += [(2, [prompt(12 + s + j) for j in range(2 + s % 5)], None) for s in range(20)]  # 2-GRPO, drifting
    for k, prompts, slots in calls:
        mem = slots * row_bytes(model, 256) if slots else None
        generate(model, prompts, k=k, max_new_tokens=4, temperature=1.0, stop_ids=[2], seed=1, decode_fn=fn,
                 mem_budget=mem, sync_every=2, stats=stats)
        combos.add((len(prompts) * k, max(map(len, prompts))))
    assert len(combos) >= 12
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert stats["graphs"] >= len(calls) and stats["steps"] > 0


class ForcedStop(Transformer):
    """A tiny model whose stop token (id 2) comes exactly at RoPE position `at`: a row with a prompt of Lr real tokens
    generates at - Lr + 2 tokens (its head row for id 2 is zero, so prefill's greedy first token is never 2)."""
    at = 0

    def forward(self, ids, pos=None, mask=None, cache=None, slot=0, hidden=False):
        out = super().forward(ids, pos, mask, cache, slot, hidden)
        if not hidden:
            out[..., 2] = torch.where(pos >= self.at, 1e4, -1e4)
        return out


@pytest.mark.parametrize("compiled", [False, True])
def test_utilisation_on_paper_like_lengths(tiny, compiled):
    """128 rows through 16 slots, lengths with mean ~ max_new_tokens / 4 and 10% truncated (the paper's regime):
    every row gets its designed length, and generated tokens / row-steps computed >= 0.9 (old main: ~0.25-0.5)."""
    model, _ = tiny
    fm = ForcedStop(model.cfg)
    fm.load_state_dict(model.state_dict())
    with torch.no_grad():
        fm.lm_head.weight[2] = 0
    n, P = 64, 128
    g = torch.Generator().manual_seed(0)
    want = [n + 8 if i % 10 == 0 else 2 + int(torch.empty(1).exponential_(1 / 9, generator=g).clamp(max=n - 3))
            for i in range(P)]
    fm.at = max(want) + 2
    prompts = [torch.randint(3, 250, (fm.at + 2 - w,), generator=g).tolist() for w in want]
    fn = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False) if compiled else None
    if compiled:
        torch._dynamo.reset()
    stats = {}
    S = 256 if compiled else max(map(len, prompts)) + n
    ro = generate(fm, prompts, k=1, max_new_tokens=n, temperature=0, stop_ids=[2], decode_fn=fn,
                  mem_budget=16 * row_bytes(fm, S), stats=stats)
    assert ro.mask.sum(1).long().tolist() == [min(w, n) for w in want]
    assert abs(sum(min(w, n) for w in want) / P / n - 0.25) < 0.05
    assert stats["tokens"] == ro.mask.sum() and stats["row_steps"] <= 16 * stats["steps"]
    util = stats["tokens"] / stats["row_steps"]
    print(f"utilisation {util:.3f} ({stats})")
    assert util >= 0.9, stats


def reference(model, prompts, k, n, seeds, stop, **kw):
    """Per row, without cache or batch: a full forward per token, drawing with the row's own uniforms."""
    out = []
    for r, s in enumerate(seeds):
        u, ids, toks, lps = torch.rand(n, generator=torch.Generator().manual_seed(s)), list(prompts[r // k]), [], []
        for t in range(n):
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[:, -1].float()
            x, lp = sample(logits, kw["temperature"], kw.get("top_k", 0), kw.get("top_p", 1.0), u[t:t + 1])
            toks.append(int(x))
            lps.append(float(lp))
            ids.append(int(x))
            if int(x) in stop:
                break
        out.append((toks, lps))
    return out


@pytest.mark.parametrize("slots,sync,compiled", [(None, 1, False), (3, 1, False), (5, 2, False), (4, 3, True)])
def test_fast_paths_equal_per_row_reference(tiny, slots, sync, compiled):
    """Same tokens and log-probs as the uncached per-row reference whatever the number of slots, refill order, check
    interval or bucket sizes (the compiled decode with 4 slots for 8 rows, refilled and compacted)."""
    model, tok = tiny
    prompts = chat_ids(tok, ["a", "a longer prompt", "mid one", "xyz"])
    seeds, kw, n = list(range(40, 48)), dict(temperature=1.0), 12
    free = generate(model, prompts, k=2, max_new_tokens=n, seed=seeds, **kw)
    stop = [int(free.tokens[0, 4]), int(free.tokens[3, 7])]  # two tokens sampled mid-way: rows stop at various times
    ref = reference(model, prompts, 2, n, seeds, stop, **kw)
    fn = torch.compile(decode_step, backend="eager", fullgraph=True, dynamic=False) if compiled else None
    mem = slots * row_bytes(model, 256 if compiled else max(map(len, prompts)) + n) if slots else None
    ro = generate(model, prompts, k=2, max_new_tokens=n, seed=seeds, stop_ids=stop, decode_fn=fn, mem_budget=mem,
                  sync_every=sync, **kw)
    assert len({len(t) for t, _ in ref}) > 2 and "eos" in ro.finish and "length" in ro.finish
    for r, (toks, lps) in enumerate(ref):
        m = int(ro.mask[r].sum())
        assert ro.tokens[r, :m].tolist() == toks
        assert (ro.logp[r, :m] - torch.tensor(lps)).abs().max() <= 1e-5
        assert ro.finish[r] == ("eos" if toks[-1] in stop else "length")


def test_autocast_bf16_over_fp32_weights(tiny):
    """train.py --dtype=bfloat16 on a CPU samples under autocast with fp32 weights: the cache is fp32 and the
    prefill's keys/values bf16. Refilled slots (3 for 8 rows) copy them in; 6b86717 raised "Index put requires the
    source and destination dtypes match" at the first refill (python bench.py's bf16 RL step row)."""
    model, tok = tiny
    prompts = chat_ids(tok, ["a", "a longer prompt", "mid one", "xyz"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = generate(model, prompts, k=2, max_new_tokens=6, seed=list(range(8)), mem_budget=3 * row_bytes(model, 64))
    m = ro.mask.bool()
    assert ro.tokens.shape[0] == 8 and m[:, 0].all() and (ro.logp[m] <= 0).all() and ro.logp[m].isfinite().all()
    assert (ro.tokens[m] < model.cfg.vocab_size).all() and ro.logp.dtype == torch.float32


def test_rope_stays_fp32_in_bf16(tiny_dir):
    """model.to(bf16) and from_pretrained(dtype=bf16) keep inv_freq fp32: the RoPE tables at positions up to 4096
    equal the fp32 model's exactly (old main: bf16 inv_freq, angles off by radians)."""
    m32, _ = from_pretrained(tiny_dir("qwen2"))
    m16, _ = from_pretrained(tiny_dir("qwen2"), dtype=torch.bfloat16)
    pos = torch.arange(4097)[None]
    for m in (m16, Transformer(m32.cfg).to(torch.bfloat16)):
        assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, rope_inv_freq(m32.cfg))
        assert all(torch.equal(a, b) for a, b in zip(m.rope(pos), m32.rope(pos)))


def test_bf16_greedy_decode_matches_fp32_where_separated(tiny):
    """A bf16 copy (sampling_copy) decodes greedily at positions ~1000-1100 the tokens of the fp32 model, up to each
    row's first step whose fp32 top-2 logit gap is under 0.02 (bf16's logit error here is <= ~0.01). Old main's
    bf16 RoPE scrambles these positions."""
    model, _ = tiny
    m16 = sampling_copy(model, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 250, (1000 + 7 * i,), generator=g).tolist() for i in range(16)]
    n = 16
    a = generate(model, prompts, max_new_tokens=n, temperature=0)
    b = generate(m16, prompts, max_new_tokens=n, temperature=0)
    checked = 0
    for r, p in enumerate(prompts):
        with torch.no_grad():  # fp32 logits along the fp32 path
            top2 = model(torch.tensor([p + a.tokens[r].tolist()]))[0, len(p) - 1:-1].topk(2, -1).values
        sep = (top2[:, 0] - top2[:, 1] > 0.02).tolist()
        t = sep.index(False) if False in sep else n
        assert b.tokens[r, :t].tolist() == a.tokens[r, :t].tolist(), (r, t)
        checked += t
    assert checked >= 20, checked


def test_sampling_copy_refreshes_in_place(tiny):
    """bf16 weights equal to the master weights cast, ties kept, and a refresh after an update writes the same
    storage (a compiled decode's graphs keep their inputs)."""
    m, _ = tiny
    c = sampling_copy(m, torch.bfloat16)
    assert all(q.dtype == torch.bfloat16 and torch.equal(q, p.bfloat16()) for p, q in zip(m.parameters(), c.parameters()))
    assert c.inv_freq.dtype == torch.float32 and not any(q.requires_grad for q in c.parameters())
    ptr = c.layers[0].mlp.up_proj.weight.data_ptr()
    with torch.no_grad():
        m.layers[0].mlp.up_proj.weight.add_(1.0)
        c2 = sampling_copy(m, torch.bfloat16, out=c)
        m.layers[0].mlp.up_proj.weight.sub_(1.0)
    assert c2 is c and c.layers[0].mlp.up_proj.weight.data_ptr() == ptr
    assert torch.equal(c.layers[0].mlp.up_proj.weight, (m.layers[0].mlp.up_proj.weight + 1.0).bfloat16())
    ro = generate(c, [[5, 6, 7]], k=2, max_new_tokens=4, temperature=1.0)  # a bf16 cache
    assert ro.tokens.shape == (2, 4)


def test_attention_backends_names_a_kernel_per_call(tiny):
    """The GPU check's kernel report runs on any device; a CPU has a masked flash kernel, so nothing is MATH here."""
    from model import attention_backends
    got = attention_backends(tiny[0].cfg, device="cpu", dtype=torch.float32)
    assert set(got) == {"decode", "prefill_scorer", "train_causal"} and "MATH" not in got.values(), got


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: SDPA kernel choice")
@pytest.mark.parametrize("call", ["decode", "prefill_scorer", "train_causal"])
def test_cuda_attention_is_fused(call):
    """Qwen2.5-Math-1.5B's attention shape in bf16: no call picks SDPA's MATH fallback (masked calls are FLEX)."""
    from model import ModelConfig, attention_backends
    cfg = ModelConfig(n_heads=12, n_kv_heads=2, head_dim=128)
    assert attention_backends(cfg, rows=8, q_len=64, keys=1024)[call] != "MATH"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: SDPA kernel choice")
def test_cuda_paths_run_without_math(tiny_dir):
    """Every attention call of the sampler (prefill, compiled decode) and the scorer (shared-prefix and plain, with
    backward) on CUDA in bf16 on a tiny GQA model, under sdpa_kernel without MATH: an SDPA call that would fall back
    raises. Left-padded prompts, so the masked paths run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from rollout import completion_logprobs, make_compiled_decode
    model, _ = from_pretrained(tiny_dir("qwen3"), device="cuda", dtype=torch.bfloat16)
    prompts = [[5, 6, 7, 8, 9] * 4, [5, 6, 7, 11], [5, 6, 7, 12, 13, 14, 15, 16, 17]]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        ro = generate(model, prompts, k=2, max_new_tokens=8, decode_fn=make_compiled_decode("cuda"))
        for share in (True, False):
            lp = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, share_prompts=share)
            lp.sum().backward()
            assert torch.isfinite(lp).all()
