"""The CUDA attention path (FlexAttention with block masks, model.FLEX) run on a CPU, compiled and without grad, against
the CPU's SDPA path: prefill, the shared-prefix and plain scorers, the eager and compiled decode give the same numbers
and tokens on a tiny GQA model with ragged left-padded prompts, and a decode step reads only the blocks holding each
row's written columns (stats["key_cols"]). Run: python -m pytest -q tests/test_flex.py"""
import pytest
import torch
import torch._dynamo

import model as M
from conftest import chat_ids
from model import FLEX_BLOCK, KVCache, from_pretrained
from rollout import attn_mask, completion_logprobs, decode_step, generate, prefill_prompts

PROMPTS = ["a", "a much longer prompt than the others", "mid one", "xyz"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))  # 4 query heads over 2 key/value heads


def both(fn):
    """fn() with SDPA, then with Flex forced (the CUDA path on this CPU)."""
    out = []
    for flex in (False, True):
        M.FLEX = flex
        try:
            out.append(fn())
        finally:
            M.FLEX = None
    return out


def test_prefill_and_scorers_match_sdpa(tiny):
    """Prefill (shared prefix, then each prompt's rest) and the trainer's scorer (shared-prefix with length buckets,
    and the plain path) under no_grad: Flex gives SDPA's hidden states, keys/values and log-probs to 1e-5."""
    model, tok = tiny
    torch._dynamo.reset()  # Flex kernels compiled afresh: the CPU build fails at shapes made dynamic by earlier tests
    prompts = chat_ids(tok, PROMPTS)
    ro = generate(model, prompts, k=2, max_new_tokens=10, seed=1, stop_ids=[tok.eos_token_id])

    def run():
        with torch.no_grad():
            _, valid, kv, h = prefill_prompts(model, prompts, 0, "cpu")
            assert isinstance(attn_mask(valid, 0, 3), torch.Tensor) != M.use_flex("cpu")  # the path under test runs
            lp = [completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, share_prompts=s,
                                      bucket_overhead=4) for s in (True, False)]  # overhead 4: several buckets
        return h, torch.stack(list(kv.k.values())), torch.stack(list(kv.v.values())), *lp

    for a, b in zip(*both(run)):
        assert (a - b).abs().max() <= 1e-5


def test_decode_matches_sdpa_and_reads_only_written_blocks(tiny):
    """One decode forward on a random cache (ragged pads, queries at columns 5..200 of 256) through the compiled Flex
    kernel equals SDPA's (1e-5), visiting key blocks 0..col // 128 only. Then generate with the whole decode step
    traced fullgraph at a static cache width (run by aot_eager: on torch 2.13 CPU inductor's Flex template miscompiles
    inside the fused decode graph, logits off by ~0.6, and fails to build at dynamic shapes; CUDA uses the Triton
    template) gives the eager SDPA decode's tokens and log-probs (1e-5), and key_cols counts each row's columns 0..col
    rounded up to 128-column blocks, where SDPA's static-width graph reads all 256 of every row each step."""
    model, tok = tiny
    torch._dynamo.reset()  # static shapes for the one kernel compiled here
    cache = KVCache(model.cfg, 4, 256, "cpu", torch.float32)
    torch.nn.init.normal_(cache.k), torch.nn.init.normal_(cache.v)
    valid, col = torch.ones(4, 256, dtype=torch.bool), torch.tensor([5, 20, 130, 200])
    valid[1, :7] = valid[3, :150] = False
    step = lambda: model(torch.full((4, 1), 7), col[:, None] - 3, attn_mask(valid, col, 1), cache, col)  # (4, 1, V)
    with torch.no_grad():
        (a, _), (b, blocks) = both(lambda: (step(), attn_mask(valid, col, 1)))
    assert (a - b).abs().max() <= 1e-5 and blocks.kv_num_blocks.flatten().tolist() == [1, 1, 2, 2]

    prompts, n = chat_ids(tok, PROMPTS), 24
    ref = generate(model, prompts, k=2, max_new_tokens=n, seed=3, temperature=1.0)  # eager SDPA: the reference
    graph = torch.compile(decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    run = lambda st: (generate(model, prompts, k=2, max_new_tokens=n, seed=3, temperature=1.0, decode_fn=graph,
                               stats=st), st)
    (sdpa, st0), (fast, st) = both(lambda: run({}))
    for ro in (sdpa, fast):
        assert torch.equal(ref.tokens, ro.tokens) and (ref.logp - ro.logp).abs().max() <= 1e-5
    Lp = ref.prompt_ids.size(1)  # one prefill group: the layout's width; decode step t reads columns 0 .. Lp + t - 1
    ceil = lambda c: -(-c // FLEX_BLOCK) * FLEX_BLOCK
    assert st["steps"] == n - 1 and st["key_cols"] == 8 * sum(ceil(Lp + t) for t in range(1, n)), (st, Lp)
    assert st0["key_cols"] == 8 * 256 * st0["steps"] > st["key_cols"]  # SDPA's static-width graph reads every column
