"""The compiled decode (rollout.make_compiled_decode) on CPU with inductor: same tokens and log-probs as the eager
decode_step, a few bucketed graphs for every decode step, and no host read in the decode loop but the periodic all-done check.
The CUDA-graph variant (mode="reduce-overhead") is the same code; its replay test skips without CUDA.
Run: python -m pytest -q tests/test_compile.py"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import rollout
from conftest import chat_ids
from model import from_pretrained
from rollout import generate, make_compiled_decode

PROMPTS = ["hello", "a longer prompt here", "abc"]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))


@pytest.fixture(scope="module")
def compiled():
    """One compiled decode for the module, fresh counters: each sampling setting compiles once, every test reuses it."""
    torch._dynamo.reset()
    counters.clear()
    return make_compiled_decode("cpu")


def run(model, tok, decode_fn, n, **kw):
    return generate(model, chat_ids(tok, PROMPTS), k=2, max_new_tokens=n, pad_id=tok.pad_token_id,
                    stop_ids=[tok.eos_token_id], seed=3, decode_fn=decode_fn, **kw)


def test_few_graphs_for_32_steps(tiny, compiled):
    """Cache columns and positions are tensors, rows are bucketed to powers of two and the cache width to multiples of
    256: 32 decode steps of 6 rows (8 slots, compacted to 4, 2, 1 as rows stop) compile at most 4 graphs, and two more
    generate calls of the same shapes compile none. Fails if a column goes back to a Python int."""
    model, tok = tiny
    stats = {}
    run(model, tok, compiled, 33, temperature=1.0, stats=stats)  # the module's compiled decode's first use
    first = counters["stats"]["unique_graphs"]
    assert 1 <= first <= 4 and first == stats["graphs"], ({k: dict(v) for k, v in counters.items()}, stats)
    run(model, tok, compiled, 33, temperature=1.0)
    run(model, tok, compiled, 33, temperature=1.0)
    assert counters["stats"]["unique_graphs"] == first, {k: dict(v) for k, v in counters.items()}


@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_compiled_decode_equals_eager(tiny, compiled, kw):
    """Greedy, T=1 sampling and top-k/top-p inside the graph: the compiled step draws the eager tokens from the same
    per-row uniforms, and its log-probs match to float tolerance."""
    model, tok = tiny
    eager, fast = run(model, tok, None, 24, **kw), run(model, tok, compiled, 24, **kw)
    assert torch.equal(eager.tokens, fast.tokens) and torch.equal(eager.mask, fast.mask)
    assert eager.finish == fast.finish
    assert (eager.logp - fast.logp).abs().max() <= 1e-5


def test_host_reads_only_at_all_done_checks(tiny, compiled, monkeypatch):
    """Every device-to-host read of the sampler goes through rollout._host: with sync_every=s over n steps the loop
    reads (n - 1) // s times, plus one read at the end of generate. A stray .item() / int() on a device tensor in the
    loop would not show here on CPU; the CUDA test below turns such syncs into errors."""
    model, tok = tiny
    reads = []
    monkeypatch.setattr(rollout, "_host", lambda x: reads.append(x.shape) or x.cpu())
    n, s = 33, 8
    fast = generate(model, chat_ids(tok, PROMPTS), k=2, max_new_tokens=n, temperature=1.0, seed=3, sync_every=s,
                    decode_fn=compiled)  # no stop ids: every row runs all n steps
    assert fast.finish == ["length"] * 6
    assert len(reads) == (n - 1) // s + 1, reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: CUDA-graph replay (reduce-overhead) vs eager")
def test_compiled_decode_cuda_graphs(tiny):
    model, tok = tiny
    model = model.cuda()
    decode_fn = make_compiled_decode("cuda")
    eager = run(model, tok, None, 24, temperature=1.0)
    fast = run(model, tok, decode_fn, 24, temperature=1.0)
    assert torch.equal(eager.tokens, fast.tokens)
    assert (eager.logp - fast.logp).abs().max() <= 1e-4
    def checked(*args):  # sync-debug mode around each compiled decode step only: generate's pageable host-to-device
        # copies (noise, prompts, slot indices at refills) and its periodic host read are outside it
        torch.cuda.set_sync_debug_mode("error")  # any sync inside the step raises
        try:
            return decode_fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    checked_run = run(model, tok, checked, 24, temperature=1.0, sync_every=1000)
    assert torch.equal(checked_run.tokens, fast.tokens)
    with torch.no_grad():  # graphs replay on live weights, not a snapshot
        model.lm_head.weight.mul_(-1)
    assert not torch.equal(run(model, tok, decode_fn, 24, temperature=1.0).tokens, fast.tokens)
