"""The CUDA attention path (FlexAttention with block masks, model.FLEX) run on a CPU, compiled and without grad, against
the CPU's SDPA path: prefill, the shared-prefix and plain scorers, the eager and compiled decode give the same numbers
and tokens on a tiny GQA model with ragged left-padded prompts, and a decode step reads only the blocks holding each
row's written columns (stats["key_cols"]). Run: python -m pytest -q tests/test_flex.py"""
import pytest
import torch

import model as M
from conftest import chat_ids
from model import FLEX_BLOCK, from_pretrained
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


def test_generate_same_tokens_and_reads_only_written_blocks(tiny):
    """generate with Flex, in the eager decode (the compiled Flex kernel per call) and in the whole decode step traced
    fullgraph at a static cache width of 256 (run by aot_eager: inductor's CPU Flex template miscompiles inside the
    fused decode graph on torch 2.13 CPU, logits off by ~0.6; CUDA uses the Triton template), gives the eager SDPA
    decode's tokens and log-probs (1e-5). SDPA's static-width graph reads all 256 columns of every row each step;
    Flex reads each row's columns 0..col rounded up to 128-column blocks, and key_cols counts exactly that."""
    model, tok = tiny
    prompts = chat_ids(tok, PROMPTS)
    n, stats = 24, {}
    ref = generate(model, prompts, k=2, max_new_tokens=n, seed=3, temperature=1.0)  # eager SDPA: the reference
    graph = torch.compile(decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    M.FLEX = True
    try:
        eager = generate(model, prompts, k=2, max_new_tokens=n, seed=3, temperature=1.0)
        fast = generate(model, prompts, k=2, max_new_tokens=n, seed=3, temperature=1.0, decode_fn=graph, stats=stats)
        with torch.no_grad():  # Flex has no CPU backward: with grad on, a CPU keeps SDPA
            blocks = attn_mask(torch.ones(3, 300, dtype=torch.bool), torch.tensor([0, 127, 200]), 1)
    finally:
        M.FLEX = None
    for ro in (eager, fast):
        assert torch.equal(ref.tokens, ro.tokens) and (ref.logp - ro.logp).abs().max() <= 1e-5
    assert blocks.kv_num_blocks.flatten().tolist() == [1, 1, 2]  # key blocks visited for queries at columns 0, 127, 200
    Lp = ref.prompt_ids.size(1)  # one prefill group: the layout's width; decode step t reads columns 0 .. Lp + t - 1
    ceil = lambda c: -(-c // FLEX_BLOCK) * FLEX_BLOCK
    assert stats["steps"] == n - 1 and stats["key_cols"] == 8 * sum(ceil(Lp + t) for t in range(1, n)), (stats, Lp)
    assert stats["key_cols"] < 8 * 256 * stats["steps"]  # what SDPA's static-width graph reads
