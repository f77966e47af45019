"""rollout.py: the batched sampler against references (uncached forward, naive argmax loop, transformers generate),
and its log-probs against the trainer's recompute. Run: python -m pytest -q tests/test_rollout.py"""
import pytest
import torch

from conftest import chat_ids
from model import KVCache, from_pretrained, stop_token_ids
from rollout import attn_mask, completion_logprobs, generate, left_pad, length_buckets, shared_prefix_len

QUESTIONS = ["What is 7 + 12?", "Compute 23 + 5 and put the final answer in \\boxed{}.", "Hi",
             "Name three colours, then say which one you like best and why."]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))


def test_cached_decode_equals_uncached_forward(tiny):
    """Prefill + one-token decode steps through the KV cache give the logits of a full uncached forward."""
    model, tok = tiny
    prompts = chat_ids(tok, ["abc", "a much longer prompt"])
    ids, valid = left_pad(prompts, tok.pad_token_id, "cpu")  # (2, Lp)
    cont = torch.randint(3, 200, (2, 6))
    full = torch.cat([ids, cont], 1)
    fvalid = torch.cat([valid, torch.ones_like(cont, dtype=torch.bool)], 1)
    fpos = (fvalid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(full, fpos, attn_mask(fvalid, 0, full.size(1)))  # (2, T, V)
        Lp = ids.size(1)
        cache = KVCache(model.cfg, 2, full.size(1), "cpu", torch.float32)
        out = [model(ids, fpos[:, :Lp], attn_mask(fvalid[:, :Lp], 0, Lp), cache, 0)[:, -1]]
        for t in range(cont.size(1)):
            m = attn_mask(fvalid[:, :Lp + t + 1], Lp + t, 1)
            out.append(model(cont[:, t:t + 1], fpos[:, Lp + t:Lp + t + 1], m, cache, Lp + t)[:, -1])
    ref_rows = ref[:, Lp - 1:]  # logits after the prompt and after each continuation token
    for t, o in enumerate(out):
        assert (o - ref_rows[:, t]).abs().max() <= 1e-4


def test_shared_prefix_len():
    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts keep one token each to prefill
    assert shared_prefix_len([[7, 8, 9]]) == 2 and shared_prefix_len([[5]]) == 0
    assert shared_prefix_len([[1, 2], [3, 4]]) == 0


def test_shared_prefix_prefill_equals_plain_left_padding(tiny):
    """Prefilling the common head once (layout prefix | pad | rest) gives the logits of a plain left-padded batch."""
    model, tok = tiny
    prompts = chat_ids(tok, ["What is 1 + 2?", "What is 13 + 24? Think.", "What"])
    assert shared_prefix_len(prompts) > 5
    ro = generate(model, prompts, k=2, max_new_tokens=12, temperature=1.0, seed=1, pad_id=tok.pad_token_id)
    ids, valid = left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        plain = completion_logprobs(model, ids.repeat_interleave(2, 0), valid.repeat_interleave(2, 0), ro.tokens,
                                    ro.mask)
    assert (plain - ro.logp).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_shared_prompt_scoring_equals_plain(tiny_dir, arch, grad_ckpt):
    """completion_logprobs computing each distinct prompt (and the head they share) once gives the plain per-row
    forward's log-probs and gradients: ragged prompts, groups of 1-3 rows, a repeated but non-adjacent prompt,
    completions of different lengths, with and without activation checkpointing."""
    model, tok = from_pretrained(tiny_dir(arch))
    model.gradient_checkpointing = grad_ckpt
    qs = ["What is 1 + 2?", "What is 13 + 24? Think.", "What", "What is 1 + 2?"]
    prompts = [p for p, n in zip(chat_ids(tok, qs), [3, 2, 1, 2]) for _ in range(n)]  # groups of 3, 2, 1, 2 rows
    assert shared_prefix_len(prompts) > 5
    ids, valid = left_pad(prompts, tok.pad_token_id, "cpu")
    B = len(prompts)
    tokens = torch.randint(3, 200, (B, 9))
    mask = (torch.arange(9) < torch.tensor([9, 4, 1, 7, 9, 2, 5, 3])[:, None]).float()
    grads = []
    for share, overhead in ((False, None), (True, None), (True, 0)):  # overhead 0: a bucket per completion length
        model.zero_grad()
        logp, ent = completion_logprobs(model, ids, valid, tokens, mask, 0.7, entropy=True, share_prompts=share,
                                        bucket_overhead=overhead)
        (logp * torch.linspace(-1, 1, B)[:, None]).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if share:
            assert (logp - plain).abs().max() <= 1e-5 and (ent - plain_ent).abs().max() <= 1e-4
        else:
            plain, plain_ent = logp.detach(), ent
    assert ((plain == 0) | (mask > 0)).all() and (plain[mask > 0] < 0).all()
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max())
    one = completion_logprobs(model, ids, valid, tokens[:, :1], mask[:, :1])  # a single completion column
    assert (one - completion_logprobs(model, ids, valid, tokens[:, :1], mask[:, :1], share_prompts=False)).abs().max() <= 1e-5


def test_length_buckets():
    lens = [9, 9, 7, 5, 5, 2]
    cost = lambda bs, o: sum((s.stop - s.start) * lens[s.start] + o for s in bs)
    assert length_buckets(lens, 1000) == [slice(0, 6)]
    assert [(s.start, s.stop) for s in length_buckets(lens, 0)] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    for o in (0, 3, 8, 20):  # never worse than one bucket, and a partition of the rows in order
        bs = length_buckets(lens, o)
        assert cost(bs, o) <= cost([slice(0, 6)], o) and bs[0].start == 0 and bs[-1].stop == 6
        assert all(a.stop == b.start for a, b in zip(bs, bs[1:]))


def test_greedy_equals_naive_argmax_loop(tiny):
    model, tok = tiny
    prompt = chat_ids(tok, ["hello world"])[0]
    ro = generate(model, [prompt], max_new_tokens=20, temperature=0, stop_ids=[], pad_id=tok.pad_token_id)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert ro.tokens[0].tolist() == ids[0, len(prompt):].tolist()
    assert ro.finish == ["length"] and ro.mask.sum() == 20


def test_greedy_equals_transformers_generate(smol, hf_smol):
    """SmolLM2, fp32, prompts of different lengths in one left-padded batch, 32 new tokens, token for token."""
    model, tok = smol
    prompts = chat_ids(tok, QUESTIONS)
    assert len({len(p) for p in prompts}) == len(prompts)
    stops = stop_token_ids(tok, model.cfg)
    ro = generate(model, prompts, max_new_tokens=32, temperature=0, stop_ids=stops, pad_id=tok.pad_token_id)
    ids, valid = left_pad(prompts, tok.pad_token_id, "cpu")
    out = hf_smol.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=32, do_sample=False,
                           eos_token_id=stops, pad_token_id=tok.pad_token_id)[:, ids.size(1):]
    for r in range(len(prompts)):
        n = int(ro.mask[r].sum())
        assert ro.tokens[r, :n].tolist() == out[r, :n].tolist()
        assert n == 32 or out[r, n - 1].item() in stops  # both stopped at the same place


def test_left_padded_batch_equals_each_prompt_alone(smol):
    model, tok = smol
    prompts = chat_ids(tok, QUESTIONS[:3])
    batch = generate(model, prompts, max_new_tokens=16, temperature=0, pad_id=tok.pad_token_id)
    for r, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=16, temperature=0, pad_id=tok.pad_token_id)
        assert batch.tokens[r].tolist() == alone.tokens[0].tolist()
        assert (batch.logp[r] - alone.logp[0]).abs().max() <= 1e-4


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logp_equals_recomputed(smol, temperature):
    """old_logp from the sampler == logp from a full forward of prompt+completion: ratio exactly 1 on-policy."""
    model, tok = smol
    stops = stop_token_ids(tok, model.cfg)
    ro = generate(model, chat_ids(tok, QUESTIONS), k=2, max_new_tokens=24, temperature=temperature, stop_ids=stops,
                  pad_id=tok.pad_token_id, seed=3)
    with torch.no_grad():
        logp, ent = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, temperature,
                                        entropy=True, chunk_tokens=7)
    assert (logp - ro.logp).abs().max() <= 1e-4
    assert ((ro.logp == 0) | (ro.mask > 0)).all() and (ent >= 0).all() and (ent[ro.mask > 0] > 0).any()


def test_seeded_reproducible_and_rows_independent(tiny):
    model, tok = tiny
    prompts = chat_ids(tok, ["x", "yy"])
    a = generate(model, prompts, k=4, max_new_tokens=12, temperature=1.0, seed=7)
    b = generate(model, prompts, k=4, max_new_tokens=12, temperature=1.0, seed=7)
    c = generate(model, prompts, k=4, max_new_tokens=12, temperature=1.0, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logp, b.logp)
    assert not torch.equal(a.tokens, c.tokens)
    for p in range(2):  # the k samples of one prompt are not forced equal (first token included)
        group = a.tokens[p * 4:(p + 1) * 4]
        assert len({tuple(r.tolist()) for r in group}) > 1
        assert len(set(group[:, 0].tolist())) > 1


def test_stop_mask_and_max_new_tokens(tiny):
    model, tok = tiny
    prompts = chat_ids(tok, ["a", "bb", "ccc"])
    free = generate(model, prompts, k=3, max_new_tokens=15, temperature=1.0, seed=0)
    # make a stop token out of a token sampled mid-way, so some rows stop and others do not
    stop = int(free.tokens[0, 5])
    ro = generate(model, prompts, k=3, max_new_tokens=15, temperature=1.0, seed=0, stop_ids=[stop], pad_id=0)
    assert ro.tokens.size(1) <= 15
    for r in range(ro.tokens.size(0)):
        toks, m = ro.tokens[r].tolist(), ro.mask[r].tolist()
        if stop in toks:
            e = toks.index(stop)
            assert ro.finish[r] == "eos"
            assert m[:e + 1] == [1.0] * (e + 1) and sum(m) == e + 1  # mask covers the stop token, nothing after
            assert all(t == 0 for t in toks[e + 1:])
        else:
            assert ro.finish[r] == "length" and sum(m) == 15
    assert "eos" in ro.finish and "length" in ro.finish


def test_top_k_one_and_tiny_top_p_are_greedy(tiny):
    model, tok = tiny
    prompts = chat_ids(tok, ["hello", "x"])
    greedy = generate(model, prompts, max_new_tokens=10, temperature=0)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        ro = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=5, **kw)
        assert torch.equal(ro.tokens, greedy.tokens)


def test_rows_do_not_depend_on_batch_composition(smol):
    """Per-row seeds: a prompt's k samples are the same alone or inside a bigger batch (T=1, rows finishing at
    different times, so finished rows are also dropped from the decode batch on the way)."""
    model, tok = smol
    stops = stop_token_ids(tok, model.cfg)
    prompts = chat_ids(tok, QUESTIONS)
    seeds = list(range(100, 100 + 2 * len(prompts)))
    batch = generate(model, prompts, k=2, max_new_tokens=20, temperature=1.0, stop_ids=stops, seed=seeds,
                     pad_id=tok.pad_token_id)
    assert "eos" in batch.finish and "length" in batch.finish
    for p in (0, 2):
        alone = generate(model, [prompts[p]], k=2, max_new_tokens=20, temperature=1.0, stop_ids=stops,
                         seed=seeds[2 * p:2 * p + 2], pad_id=tok.pad_token_id)
        n = alone.tokens.size(1)
        assert batch.tokens[2 * p:2 * p + 2, :n].tolist() == alone.tokens.tolist()
        assert (batch.logp[2 * p:2 * p + 2, :n] - alone.logp).abs().max() <= 1e-4


def test_empty_inputs_are_no_ops(tiny):
    model, tok = tiny
    ro = generate(model, [], k=2, max_new_tokens=8)
    assert ro.tokens.shape == (0, 0) and ro.prompt_ids.size(0) == 0 and ro.finish == []
    logp, ent = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, entropy=True)
    assert logp.shape == ent.shape == (0, 0)


def test_chunked_generation_equals_one_chunk(tiny):
    """A KV memory budget of one prompt's rows splits generation into chunks; tokens and logp are unchanged."""
    model, tok = tiny
    prompts = chat_ids(tok, ["a", "a longer prompt", "mid one"])
    one = generate(model, prompts, k=2, max_new_tokens=10, seed=4, stop_ids=[5, 9])
    cfg = model.cfg
    row = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (max(map(len, prompts)) + 10) * 4
    chunked = generate(model, prompts, k=2, max_new_tokens=10, seed=4, stop_ids=[5, 9], mem_budget=2 * row)
    assert torch.equal(one.tokens, chunked.tokens) and (one.logp - chunked.logp).abs().max() <= 1e-5
    assert one.finish == chunked.finish and torch.equal(one.mask, chunked.mask)
    lp = completion_logprobs(model, chunked.prompt_ids, chunked.prompt_mask, chunked.tokens, chunked.mask)
    assert (lp - chunked.logp).abs().max() <= 1e-4
