"""
The batched sampler: k samples for each of P prompts, and the matching log-prob scorer the trainer uses.

    ro = generate(model, prompts, k=2, max_new_tokens=64, temperature=1.0, stop_ids=[2], seed=0)
    ro.tokens (B, Tn), ro.mask (B, Tn), ro.logp (B, Tn), ro.finish ["eos" | "length"] with B = P * k
    logp = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, temperature=1.0)

Layout (shared by sampling and scoring, so old_logp == logp on-policy): prompts take Lp columns, padded where
needed, and completions follow at column Lp; RoPE positions count real tokens only (pos = cumsum(valid) - 1), pad
keys are masked, so where the padding sits does not change any number. The prefix every prompt shares (the chat
template's system turn) is prefilled once, each unique prompt's rest once, and the cache forked into k rows
(nanochat); decode runs on a preallocated cache. Row r belongs to prompt r // k. The scorer does the same with
autograd on: the shared prefix and each distinct prompt forwarded once, completions on top of their keys/values.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import KVCache, linear


@dataclass
class Rollout:
    prompt_ids: torch.Tensor   # (B, Lp) prompt ids: shared prefix, padding, the rest (see Layout above)
    prompt_mask: torch.Tensor  # (B, Lp) bool, True on real prompt tokens
    tokens: torch.Tensor       # (B, Tn) sampled ids, pad_id after a row stops
    mask: torch.Tensor         # (B, Tn) float, 1 up to and including the stop token
    logp: torch.Tensor         # (B, Tn) fp32 log-prob of each sampled token at `temperature` (0 where mask is 0)
    finish: list               # B strings: "eos" (a stop token was sampled) or "length" (hit max_new_tokens)


def left_pad(seqs, pad_id, device):
    """list of P id lists -> ids (P, L), valid (P, L) bool, left-padded."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
        valid[i, L - len(s):] = True
    return ids.to(device), valid.to(device)


def shared_prefix_len(prompts):
    """Length of the token prefix all prompts share, leaving every prompt at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    c = 0
    while c < n and all(p[c] == first[c] for p in prompts):
        c += 1
    return c


def attn_mask(valid, q_start, Tq):
    """Bool mask (B, 1, Tq, S) for queries at columns q_start..q_start+Tq-1 over keys 0..S-1 (S = valid.size(1)):
    causal, pad keys hidden, and the diagonal always open so pad queries never see an all-masked row (NaN)."""
    S = valid.size(1)
    kcol = torch.arange(S, device=valid.device)
    qcol = torch.arange(q_start, q_start + Tq, device=valid.device)[:, None]
    return ((kcol <= qcol) & valid[:, None, :] | (kcol == qcol))[:, None]


def sample(logits, temperature, top_k, top_p, u):
    """logits (B, V) fp32 -> (ids (B,), logp (B,)). logp is under the temperature-scaled full softmax, which is what
    the trainer recomputes; top-k / top-p truncation is not reflected in it (leave them off for training).
    u (B,) uniforms in [0, 1): the randomness of this draw, one number per row."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, logits.log_softmax(-1).gather(-1, ids[:, None])[:, 0]
    logits = logits / temperature
    logp_all = logits.log_softmax(-1)  # (B, V)
    if top_k > 0 or top_p < 1.0:
        if top_k > 0:
            kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, order = logits.sort(-1, descending=True)
            p_sorted = sorted_logits.softmax(-1)
            drop = p_sorted.cumsum(-1) - p_sorted > top_p  # keep the smallest prefix whose mass reaches top_p
            logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
    else:
        probs = logp_all.exp()
    # inverse-CDF draw: one uniform per row, no host sync, and ~10x cheaper on CPU than exponential noise over (B, V)
    cdf = probs.cumsum(-1)  # (B, V)
    ids = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]  # right=True skips p=0 tokens
    ids = ids.clamp_(max=cdf.size(-1) - 1)
    return ids, logp_all.gather(-1, ids[:, None])[:, 0]


class PrefixKV:
    """A differentiable stand-in for KVCache, for prompt prefill and scoring: layer i's keys/values are those already
    held (B, Hkv, slot, hd) followed by the new chunk's. Unlike KVCache nothing is written in place, so autograd runs
    through it. Re-running a layer (activation checkpointing recomputes) reads only the first `slot` columns."""

    def __init__(self, k=None, v=None):
        self.k, self.v = k or {}, v or {}

    def update(self, layer, slot, k, v):
        if slot:
            k = torch.cat([self.k[layer][:, :, :slot], k], 2)
            v = torch.cat([self.v[layer][:, :, :slot], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def rows(self, idx):
        """The same keys/values for batch rows idx (B',): expand or gather, both differentiable."""
        pick = lambda t: t.expand(len(idx), *t.shape[1:]) if t.size(0) == 1 else t.index_select(0, idx)
        return PrefixKV({i: pick(t) for i, t in self.k.items()}, {i: pick(t) for i, t in self.v.items()})


def prefill_prompts(model, prompts, pad_id, device):
    """Prompts in the layout [shared prefix | left padding | rest of each prompt]: chat templates give every prompt the
    same head (system turn + "user\n" + task wording), whose keys/values are computed once (batch 1), then each
    prompt's rest on top of them. Differentiable when grad is on (the scorer), used under no_grad by the sampler.
    Returns ids (P, Lp), valid (P, Lp), kv (a PrefixKV of P rows, Lp columns), h (P, D) at each last position."""
    P, c = len(prompts), shared_prefix_len(prompts)
    ids, valid = left_pad([p[c:] for p in prompts], pad_id, device)  # (P, Lp - c)
    ids = torch.cat([torch.tensor(prompts[0][:c], dtype=torch.long, device=device).expand(P, c), ids], 1)  # (P, Lp)
    valid = torch.cat([torch.ones(P, c, dtype=torch.bool, device=device), valid], 1)
    Lp = ids.size(1)
    pos = (valid.cumsum(-1) - 1).clamp(min=0)  # (P, Lp)
    kv = PrefixKV()
    if c:
        model(ids[:1, :c], pos[:1, :c], attn_mask(valid[:1, :c], 0, c), kv, 0, hidden=True)
        kv = kv.rows(torch.arange(P, device=device))  # (1, ...) -> (P, ...) as a view
    h = model(ids[:, c:], pos[:, c:], attn_mask(valid, c, Lp - c), kv, c, hidden=True)  # (P, Lp - c, D)
    return ids, valid, kv, h[:, -1]


def sample_step(logits, u, done, stop, pad_id, temperature, top_k, top_p):
    """Each row's next token from logits (B, V) with its uniform u (B,); rows already done (B,) get pad_id and logp 0.
    Returns tok (B,), logp (B,), done after this token (a stop id from stop (n_stop,) was sampled)."""
    tok, lp = sample(logits, temperature, top_k, top_p, u)
    tok, lp = torch.where(done, pad_id, tok), torch.where(done, 0.0, lp)
    return tok, lp, done | (tok[:, None] == stop).any(-1)  # not torch.isin: it may sync


def decode_step(model, tok, pos, valid, cache, slot, u, done, stop, pad_id, temperature, top_k, top_p):
    """Feed tok (B,) at RoPE positions pos (B,) into cache column slot, then sample_step on the logits. valid (B, W):
    key columns that hold tokens (those past slot are masked here). slot is a 0-dim tensor and the cache is written
    with index_copy_, so one compiled graph (make_compiled_decode) serves every step."""
    mask = (valid & (torch.arange(valid.size(1), device=valid.device) <= slot))[:, None, None]  # (B, 1, 1, W)
    logits = model(tok[:, None], pos[:, None], mask, cache, slot)[:, -1].float()  # (B, V)
    return sample_step(logits, u, done, stop, pad_id, temperature, top_k, top_p)


def make_compiled_decode(device):
    """decode_step compiled whole (fullgraph, static shapes): inductor on CPU, CUDA graphs (reduce-overhead) on CUDA.
    generate runs it on the full-width cache and never drops rows; the eager decode_step is its reference."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)


def _host(x):
    """Every device-to-host read of the sampler (a sync on GPU) goes through here, so tests can count them."""
    return x.cpu()


@torch.no_grad()
def generate(model, prompts, k=1, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), pad_id=0,
             seed=0, sync_every=None, decode_fn=None, mem_budget=None):
    """prompts: list of P token-id lists (ragged). Returns a Rollout with B = P * k rows (see module docstring).
    seed: an int, or a list of B ints, one per row. Each row draws its own noise from its own seed, so a row's sample
    does not depend on which other rows share the batch (same result split over DDP ranks, chunks, or prompts).
    sync_every: check "all rows stopped" every this many steps (default 1 on CPU, 16 on GPU).
    decode_fn: make_compiled_decode's compiled decode_step; None: the eager decode_step, dropping finished rows.
    mem_budget: bytes the KV cache may take. Prompts are generated in chunks of whole prompts (k rows each) that fit
    it, at least one prompt a chunk; None: one chunk."""
    device, cfg = model.embed_tokens.weight.device, model.cfg
    P, n = len(prompts), max_new_tokens
    B = P * k
    seeds = [hash((seed, r)) & 0x7FFFFFFF for r in range(B)] if isinstance(seed, int) else list(seed)
    assert len(seeds) == B, f"need one seed per row ({B}), got {len(seeds)}"
    L = max(map(len, prompts), default=0)  # the widest layout: a chunk's Lp is at most its longest prompt
    row_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (L + n) * model.embed_tokens.weight.element_size()
    per = max(1, int(mem_budget // (k * row_bytes))) if mem_budget else max(P, 1)  # prompts a chunk
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    ro = Rollout(torch.full((B, L), pad_id, device=device), torch.zeros((B, L), dtype=torch.bool, device=device),
                 torch.full((B, n), pad_id, device=device), *torch.zeros((2, B, n), device=device), [])
    done = torch.zeros(B, dtype=torch.bool, device=device)
    sync_every = sync_every or (1 if device.type == "cpu" else 16)
    for i in range(0, P, per):
        r = slice(i * k, min(i + per, P) * k)
        ids, valid, *out = _generate_chunk(model, prompts[i:i + per], k, seeds[r], n, stop, pad_id, temperature, top_k,
                                           top_p, sync_every, decode_fn)
        ro.prompt_ids[r, L - ids.size(1):], ro.prompt_mask[r, L - ids.size(1):] = ids, valid  # left-padded to L
        ro.tokens[r], ro.logp[r], ro.mask[r], done[r] = out
    h = _host(torch.cat([done, ro.mask.any(0)]))  # (B + n,) which rows stopped, which columns any row reached
    Tn = int(h[B:].nonzero().max()) + 1 if h[B:].any() else 0  # drop columns no row reached
    return Rollout(ro.prompt_ids, ro.prompt_mask, ro.tokens[:, :Tn], ro.mask[:, :Tn], ro.logp[:, :Tn],
                   ["eos" if e else "length" for e in h[:B].tolist()])


def _generate_chunk(model, prompts, k, seeds, n, stop, pad_id, temperature, top_k, top_p, sync_every, decode_fn):
    """generate's work for one chunk -> ids (B, Lp), valid (B, Lp), tokens (B, n), logp (B, n), mask (B, n), done (B,)."""
    device, cfg, B = model.embed_tokens.weight.device, model.cfg, len(seeds)
    noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds])
    noise = noise.to(device)  # (B, n): row r's uniforms, drawn on CPU so every device agrees
    # prefill: the shared prefix once, the rest of each unique prompt once, then fork the cache into k rows
    ids, valid, kv, h = prefill_prompts(model, prompts, pad_id, device)
    ids, valid, Lp = ids.repeat_interleave(k, 0), valid.repeat_interleave(k, 0), ids.size(1)
    S = -(-(Lp + n) // 64) * 64  # cache width, rounded up so the compiled step meets few distinct shapes
    cache = KVCache(cfg, B, S, device, model.embed_tokens.weight.dtype)
    for i in range(cfg.n_layers):
        cache.k[i, :, :, :Lp] = kv.k[i].repeat_interleave(k, dim=0)
        cache.v[i, :, :, :Lp] = kv.v[i].repeat_interleave(k, dim=0)
    del kv
    logits = linear(h, model.lm_head).float().repeat_interleave(k, 0)  # (B, V): each row samples its own first token
    kv_valid = F.pad(valid, (0, S - Lp), value=True)  # (B, S): completion columns hold tokens once written
    pos = valid.sum(-1)  # (B,) RoPE position of the first completion token
    slots = torch.arange(Lp, S, device=device)  # cache column of each completion token (0-dim views)
    tokens = torch.full((B, n), pad_id, dtype=torch.long, device=device)
    logp, mask = torch.zeros((2, B, n), device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # decode row i is output row rows[i]; the eager path drops finished rows
    for t in range(n):
        if t == 0:
            out = sample_step(logits, noise[:, 0], done, stop, pad_id, temperature, top_k, top_p)
        else:
            if t % sync_every == 0:  # the loop's only host read: stop once every row is done
                live = _host(~done[rows])  # (b,)
                if not live.any():
                    break
                if decode_fn is None and live.sum() <= 0.75 * len(live):  # RL rollouts are mostly short: ~2x less decode
                    keep = live.nonzero()[:, 0].to(device)
                    rows = rows[keep]
                    cache.keep_rows(keep)
            width = S if decode_fn else Lp + t  # compiled: one static width; eager: the keys written so far
            out = (decode_fn or decode_step)(model, tokens[rows, t - 1], pos[rows] + t - 1, kv_valid[rows, :width],
                                             cache, slots[t - 1], noise[rows, t], done[rows], stop, pad_id,
                                             temperature, top_k, top_p)
        mask[rows, t] = (~done[rows]).float()
        tokens[rows, t], logp[rows, t], done[rows] = out
    return ids, valid, tokens, logp, mask, done


def _hidden_plain(model, prompt_ids, prompt_mask, tokens):
    """One forward of [prompt | completion] per row -> hidden states predicting each completion token (B, Tk, D)."""
    first = int(prompt_mask.any(0).float().argmax())  # drop prompt columns that are padding in every row
    prompt_ids, prompt_mask = prompt_ids[:, first:], prompt_mask[:, first:]
    ids = torch.cat([prompt_ids, tokens], 1)  # (B, Lp + Tk)
    valid = torch.cat([prompt_mask, torch.ones_like(tokens, dtype=torch.bool)], 1)
    Lp, Tk = prompt_ids.size(1), tokens.size(1)
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    amask = None if bool(prompt_mask.all()) else attn_mask(valid, 0, ids.size(1))  # no padding: fast causal path
    return model(ids, pos, amask, hidden=True)[:, Lp - 1:Lp + Tk - 1]


def _hidden_shared(model, prompt_ids, prompt_mask, tokens, lens, overhead):
    """_hidden_plain computed the way the sampler computes it: the prefix all prompts share once (batch 1), each
    distinct prompt once, then every row's completion on top of its prompt's keys/values. Gradients flow back through
    the shared parts, so both values and gradients are _hidden_plain's. Rows with the same prompt must be adjacent
    (the sampler's and the trainer's layout); at k rows a prompt the prompt costs 1/k of the plain path's.
    lens (B,): completion lengths; rows are fed in length buckets (length_buckets with this overhead)."""
    B, Tk = tokens.shape
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)  # (B-1,)
    group = torch.cat([same.new_zeros(1), ~same]).long().cumsum(0)  # (B,) index of each row's distinct prompt
    starts = torch.cat([same.new_ones(1), ~same]).nonzero()[:, 0]
    prompts = [prompt_ids[r][prompt_mask[r]].tolist() for r in starts.tolist()]
    _, valid, kv, h = prefill_prompts(model, prompts, 0, tokens.device)  # pad keys are masked: any pad id works
    Lp = valid.size(1)
    h = h[group, None]  # (B, 1, D): each row's last prompt position, which predicts completion token 0
    if Tk == 1:
        return h
    # completions in buckets of similar length, each cut to its longest row: less compute on padding
    order = lens.argsort(descending=True)
    n_prompt = valid.sum(-1)  # (P,) real prompt tokens
    outs = []
    for rows in length_buckets(lens[order].tolist(), overhead):
        idx = order[rows]  # (b,) rows of this bucket
        T = int(lens[idx[0]]) - 1  # completion tokens to feed: the last one predicts nothing we score
        if T <= 0:
            outs.append(h.new_zeros(len(idx), Tk - 1, h.size(-1)))
            continue
        v = torch.cat([valid[group[idx]], valid.new_ones(len(idx), T)], 1)  # (b, Lp + T)
        pos = n_prompt[group[idx], None] + torch.arange(T, device=v.device)  # (b, T) RoPE positions after the prompt
        out = model(tokens[idx, :T], pos, attn_mask(v, Lp, T), kv.rows(group[idx]), Lp, hidden=True)  # (b, T, D)
        outs.append(F.pad(out, (0, 0, 0, Tk - 1 - T)))
    rest = torch.cat(outs)[order.argsort()]  # (B, Tk - 1, D) back in row order
    return torch.cat([h, rest], 1)


def length_buckets(lens, overhead):
    """Split rows sorted by length (descending) into contiguous buckets, each padded to its first row's length,
    minimising padded tokens + `overhead` token-equivalents per bucket (a forward's fixed cost). Returns slices."""
    n = len(lens)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[j]: cost of rows [0, j); cut[j]: start of its last bucket
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * lens[i] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    out, j = [], n
    while j:
        out.append(slice(cut[j], j))
        j = cut[j]
    return out[::-1]


def completion_logprobs(model, prompt_ids, prompt_mask, tokens, mask, temperature=1.0, entropy=False, chunk_tokens=None,
                        share_prompts=True, bucket_overhead=None):
    """Forward of [prompt | completion] in the sampler's layout -> logp (B, Tn) fp32 of each completion token at
    `temperature` (0 where mask is 0), and its entropy (B, Tn) too if entropy=True. Differentiable.
    share_prompts: shared prompt tokens once, completions in length buckets (_hidden_shared); False is the plain
    reference path it is tested against. bucket_overhead: what one more forward call costs, in tokens (default 128 on
    CPU, where a bucket of ~128 tokens still runs near the matmul peak; 4096 elsewhere, a guess: never measured).
    Logits are made chunk_tokens tokens at a time so (B, Tn, V) fp32 logits never exist whole."""
    B, Tn = tokens.shape
    if B == 0:  # no rows (e.g. a DDP rank with nothing to score): empty results of the same shapes
        return (mask.new_zeros(0, Tn),) * 2 if entropy else mask.new_zeros(0, Tn)
    Tk = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1  # drop columns past every row's end
    if share_prompts:
        overhead = bucket_overhead if bucket_overhead is not None else 128 if tokens.device.type == "cpu" else 4096
        h = _hidden_shared(model, prompt_ids, prompt_mask, tokens[:, :Tk], mask.sum(1).long().clamp(min=1), overhead)
    else:
        h = _hidden_plain(model, prompt_ids, prompt_mask, tokens[:, :Tk])  # (B, Tk, D)
    # logits only where a completion token is (no lm_head or log-softmax on padding), ~256 MB of fp32 at a time
    m = mask[:, :Tk] > 0  # (B, Tk)
    h, tok = h[m], tokens[:, :Tk][m]  # (N, D), (N,)
    chunk = chunk_tokens or max(1, (1 << 26) // model.cfg.vocab_size)
    t = max(temperature, 1e-6) if temperature > 0 else 1.0
    logps, ents = [], []
    for i in range(0, h.size(0), chunk):
        lp_all = (model.lm_head(h[i:i + chunk]).float() / t).log_softmax(-1)  # (n, V)
        logps.append(lp_all.gather(-1, tok[i:i + chunk, None])[:, 0])
        if entropy:
            with torch.no_grad():
                ents.append(-(lp_all.exp() * lp_all).sum(-1))
    def scatter(xs):  # (N,) chunks -> (B, Tn), 0 where mask is 0 (no chunks when no row has a token)
        zeros = mask.new_zeros(B, Tn)
        return zeros.index_put((F.pad(m, (0, Tn - Tk)),), torch.cat(xs)) if xs else zeros
    return (scatter(logps), scatter(ents)) if entropy else scatter(logps)


class Bf16Emulation(torch.overrides.TorchFunctionMode):
    """`with Bf16Emulation():` bf16 sampling numerics at fp32 speed, for CPUs where bf16 matmul is slow (AVX2): the
    inputs and output of every matmul and attention are rounded to bf16 (kept fp32), as autocast casts them. An
    EMULATION, not bf16: elementwise ops between matmuls stay fp32 (autocast runs some in bf16), so its numbers differ
    from real autocast about as much as autocast from fp32 (tests/test_precision.py). No grad: rounding detaches."""
    MATMULS = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, F.scaled_dot_product_attention}

    def __enter__(self):
        self.params = {}  # rounded weights, made once per `with` block (in-place optimizer steps bump no version)
        return super().__enter__()

    def __exit__(self, *exc):
        self.params = {}  # frees the rounded copy between steps
        return super().__exit__(*exc)

    def round(self, t):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            return t
        if isinstance(t, torch.nn.Parameter):
            if id(t) not in self.params:
                self.params[id(t)] = t.detach().bfloat16().float()
            return self.params[id(t)]
        return t.bfloat16().float()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.MATMULS:
            return func(*args, **kwargs)
        return self.round(func(*map(self.round, args), **{k: self.round(v) for k, v in kwargs.items()}))
