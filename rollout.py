"""
The batched sampler: k samples for each of P prompts, and the matching log-prob scorer the trainer uses.

    ro = generate(model, prompts, k=2, max_new_tokens=64, temperature=1.0, stop_ids=[2], seed=0)
    ro.tokens (B, Tn), ro.mask (B, Tn), ro.logp (B, Tn), ro.finish ["eos" | "length"] with B = P * k
    logp = completion_logprobs(model, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, temperature=1.0)

Layout (shared by sampling and scoring): prompts take Lp columns, padded where needed, and completions follow at
column Lp; RoPE positions count real tokens only (pos = cumsum(valid) - 1) and pad keys are masked, so where the
padding sits changes no number beyond float summation order. The prefix every prompt shares (the chat template's
system turn) is prefilled once, each unique prompt's rest once, and its keys/values copied into the slots of its k
rows (nanochat); decode runs continuously batched on a preallocated cache. Row r belongs to prompt r // k. The scorer
does the same with autograd on: the shared prefix and each distinct prompt once, completions on top.

What is exact where: in fp32 on a CPU a row's tokens and log-probs do not depend on its batch, slot or refill order,
and the trainer's recompute gives the sampler's log-probs to ~1e-6 (ratio 1 to float precision; tests/test_sampler_fast.py).
On a GPU kernels are chosen by shape, so rows in different batches differ in the last bits and a sampled token
can flip where two are near-tied; under bf16 the sampler's log-probs differ from the trainer's fp32 ones (|d logp|
up to ~1 seen in the bf16 emulation), and --dtype=float32 still uses TF32 matmuls. Per-row seeds still fix each row's noise
(a rerun repeats as far as the GPU's kernels are deterministic); use old_logp = "recompute" there.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torch.nn.attention.flex_attention import BlockMask

from model import FLEX_BLOCK, KVCache, linear, use_flex


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
    """Mask for queries at columns q_start..q_start+Tq-1 (q_start an int, or (B,) per row) over keys 0..S-1
    (S = valid.size(1)): causal, pad keys hidden, and the diagonal always open so pad queries never see an all-masked
    row (NaN). Bool (B, 1, Tq, S) for SDPA, or on CUDA (model.use_flex) a FlexAttention BlockMask, whose blocks past
    each row's last query column are empty, so the kernel skips (never reads) them."""
    B, S = valid.shape
    q0 = q_start if torch.is_tensor(q_start) else valid.new_full((B,), q_start, dtype=torch.long)  # (B,)
    if use_flex(valid.device):  # each query block reads key blocks 0 .. the one holding its last query's column
        valid = valid.contiguous()  # inductor's CPU Flex kernel refuses strided (sliced / expanded) mask inputs
        nq, nk, dev = -(-Tq // FLEX_BLOCK), -(-S // FLEX_BLOCK), valid.device
        last = q0[:, None] + (torch.arange(1, nq + 1, device=dev) * FLEX_BLOCK).clamp(max=Tq) - 1  # (B, nq)
        n = (last // FLEX_BLOCK + 1).clamp(max=nk).to(torch.int32)[:, None]  # (B, 1, nq)
        idx = torch.arange(nk, device=dev, dtype=torch.int32).expand(B, 1, nq, nk).contiguous()
        keep = lambda b, h, q, kv: (kv <= q0[b] + q) & valid[b, kv] | (kv == q0[b] + q)
        return BlockMask.from_kv_blocks(n, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=keep, seq_lengths=(Tq, S))
    kcol = torch.arange(S, device=valid.device)
    qcol = q0[:, None, None] + torch.arange(Tq, device=valid.device)[:, None]  # (B, Tq, 1)
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


def decode_step(model, tok, pos, valid, cache, col, u, done, stop, pad_id, temperature, top_k, top_p):
    """Feed tok (B,) at RoPE positions pos (B,) into cache columns col (B,), then sample_step on the logits.
    valid (B, W): key columns that hold tokens (those past each row's col are masked here). col is a tensor and the
    cache is written in place, so one compiled graph (make_compiled_decode) serves every step of a (B, W) shape."""
    logits = model(tok[:, None], pos[:, None], attn_mask(valid, col, 1), cache, col)[:, -1].float()  # (B, V)
    return sample_step(logits, u, done, stop, pad_id, temperature, top_k, top_p)


def make_compiled_decode(device):
    """decode_step compiled whole (fullgraph, static shapes): inductor on CPU, CUDA graphs (reduce-overhead) on CUDA.
    generate feeds it a few bucketed shapes only (rows a power of two, cache width a multiple of 256), so a run
    compiles a handful of graphs; the eager decode_step is its reference."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" else None
    return torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)


def _host(x):
    """Every device-to-host read of the sampler (a sync on GPU) goes through here, so tests can count them."""
    return x.cpu()


@torch.no_grad()
def generate(model, prompts, k=1, max_new_tokens=64, temperature=1.0, top_p=1.0, top_k=0, stop_ids=(), pad_id=0,
             seed=0, sync_every=None, decode_fn=None, mem_budget=None, stats=None):
    """prompts: list of P token-id lists (ragged). Returns a Rollout with B = P * k rows (see module docstring).
    seed: an int, or a list of B ints, one per row. Each row draws its own noise from its own seed, so (in fp32 on a
    CPU) a row's sample does not depend on which rows share its batch, when it started or in which slot it ran.
    Continuous batching: the decode batch has R slots (a power of two when compiled); a row that stops leaves its slot
    at the next host check and the next queued row takes it (its prompt's cache columns copied in, its first token
    sampled from the prompt's logits; the k rows of a prompt share one prefill). Once the queue is empty, live rows
    are compacted into fewer slots. sync_every: host checks every this many steps (default 1 on CPU, 16 on GPU).
    decode_fn: make_compiled_decode's compiled decode_step (cache width a multiple of 256); None: eager decode_step
    reading only the columns written so far. mem_budget: bytes the KV cache may take (R slots fit it); None: R = B.
    stats: a dict to which steps, row_steps, tokens, key_cols, graphs are added (utilisation = tokens / row_steps)."""
    device, cfg, dtype = model.embed_tokens.weight.device, model.cfg, model.embed_tokens.weight.dtype
    P, n = len(prompts), max_new_tokens
    B = P * k
    seeds = [hash((seed, r)) & 0x7FFFFFFF for r in range(B)] if isinstance(seed, int) else list(seed)
    assert len(seeds) == B, f"need one seed per row ({B}), got {len(seeds)}"
    assert n > 0, f"max_new_tokens={n}: need at least 1"
    L = max(map(len, prompts), default=0)  # the widest layout: a group's Lp is at most its longest prompt
    S = -(-(L + n) // 256) * 256 if decode_fn else L + n  # cache width; compiled: few distinct shapes
    cap = max(1, int(mem_budget // (2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * S * dtype.itemsize))
              if mem_budget else 1 << 30)  # slots that fit the budget
    bucket = (lambda x: min(1 << (x - 1).bit_length(), 1 << (cap.bit_length() - 1))) if decode_fn else (lambda x: min(x, cap))
    R, g = bucket(max(B, 1)), max(1, bucket(max(B, 1)) // k)  # slots; prompts prefilled together
    dev = lambda xs: torch.tensor(xs, dtype=torch.long).to(device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    noise = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds] + [torch.zeros(n)])
    noise = noise.to(device)  # (B + 1, n): row r's uniforms, drawn on CPU so every device agrees
    prompt_ids, prompt_mask = torch.full((B, L), pad_id, device=device), torch.zeros((B, L), dtype=torch.bool, device=device)
    # outputs, with a scratch row B (idle slots) and a scratch column n
    tokens = torch.full((B + 1, n + 1), pad_id, dtype=torch.long, device=device)
    logp, mask = torch.zeros((2, B + 1, n + 1), device=device)
    done_rows = torch.zeros(B + 1, dtype=torch.bool, device=device)
    # slot state: last token, its RoPE position, cache column, tokens generated, output row (B: idle), stopped
    cache = KVCache(cfg, R, S, device, dtype)
    valid = torch.ones((R, S), dtype=torch.bool, device=device)  # (R, S) key columns holding tokens
    tok, pos, col, t = torch.zeros((4, R), dtype=torch.long, device=device)
    row, done = torch.full((R,), B, device=device), torch.ones(R, dtype=torch.bool, device=device)
    owner, tt, hc, nxt, group = [None] * R, [0] * R, [0] * R, 0, {}  # host mirror of the slots (hc: col); queue head

    def fill(free):
        """Queued rows into free slots: their prompt's keys/values and first token (sampled from its logits)."""
        nonlocal nxt
        take = list(zip(free, range(nxt, B)))
        nxt += len(take)
        for gi in sorted({r // k // g for _, r in take}):
            if gi not in group:  # rows are taken in order: earlier groups are spent
                ps = range(gi * g, min(gi * g + g, P))
                ids, pv, kv, h = prefill_prompts(model, [prompts[p] for p in ps], pad_id, device)
                rows = slice(ps[0] * k, ps[-1] * k + k)
                prompt_ids[rows, L - ids.size(1):] = ids.repeat_interleave(k, 0)
                prompt_mask[rows, L - ids.size(1):] = pv.repeat_interleave(k, 0)
                group.clear()
                group[gi] = (torch.stack(list(kv.k.values())), torch.stack(list(kv.v.values())), pv,
                             linear(h, model.lm_head).float())  # (n_layers, g, Hkv, Lp, hd) x 2, (g, Lp), (g, V)
            gk, gv, pv, logits = group[gi]
            hs, hr = zip(*[(s, r) for s, r in take if r // k // g == gi])
            Lp, ss, rr = pv.size(1), dev(hs), dev(hr)
            pp = rr // k - gi * g
            cache.k[:, ss, :, :Lp], cache.v[:, ss, :, :Lp] = gk[:, pp].to(dtype), gv[:, pp].to(dtype)  # (autocast: bf16)
            valid[ss], valid[ss, :Lp] = True, pv[pp]
            pos[ss], col[ss], t[ss], row[ss] = pv[pp].sum(-1), Lp, 1, rr
            x, lp, d = sample_step(logits[pp], noise[rr, 0], done[ss] & False, stop, pad_id, temperature, top_k, top_p)
            tokens[rr, 0], logp[rr, 0], mask[rr, 0], tok[ss], done[ss] = x, lp, 1.0, x, d
            for s, r in zip(hs, hr):
                owner[s], tt[s], hc[s] = r, 1, Lp

    fill(list(range(R)) if B else [])
    flex = use_flex(device)
    shapes, steps, row_steps, key_cols, first = set(), 0, 0, 0, True
    while any(o is not None for o in owner):
        if not first or n == 1:  # the loop's only host read: which rows stopped (or reached n tokens)
            d = _host(done).tolist()
            free = [s for s in range(R) if owner[s] is not None and (d[s] or tt[s] >= n)]
            if free:
                fin = dev(free)
                done_rows[row[fin]] = done[fin]
                row[fin], done[fin], valid[fin], col[fin] = B, True, True, 0  # idle: scratch row, cache column 0 on
                for s in free:
                    owner[s], hc[s] = None, 0
                fill(free)
            live = [s for s in range(R) if owner[s] is not None]
            if not live:
                break
            if nxt == B and bucket(len(live)) < R and (decode_fn or len(live) <= 0.75 * R):  # compact live rows
                keep = live + [s for s in range(R) if owner[s] is None][:bucket(len(live)) - len(live)]
                idx = dev(keep)
                cache.k, cache.v = cache.k[:, idx], cache.v[:, idx]
                valid, tok, pos, col, t, row, done = (x[idx] for x in (valid, tok, pos, col, t, row, done))
                owner, tt, hc = ([x[s] for s in keep] for x in (owner, tt, hc))
                R = len(keep)
        first = False
        for _ in range(min(sync_every or (1 if device.type == "cpu" else 16),
                           min(n - tt[s] for s in range(R) if owner[s] is not None))):
            W = S if decode_fn else max(hc[s] + 1 for s in range(R) if owner[s] is not None)
            shapes.add((R, W))
            x, lp, d = (decode_fn or decode_step)(model, tok, pos, valid[:, :W], cache, col, noise[row, t.clamp(max=n - 1)],
                                                  done, stop, pad_id, temperature, top_k, top_p)
            mask[row, t] = (~done).float()
            tokens[row, t], logp[row, t], tok, done = x, lp, x, d
            pos, col, t = pos + 1, (col + 1).clamp(max=S - 1), (t + 1).clamp(max=n)
            # keys attention reads: all W columns (SDPA), or each row's columns 0..col in whole blocks (Flex)
            key_cols += sum(min(-(-(c + 1) // FLEX_BLOCK) * FLEX_BLOCK, W) for c in hc) if flex else R * W
            tt, hc = [x + 1 for x in tt], [min(c + 1, S - 1) for c in hc]
            steps, row_steps = steps + 1, row_steps + R
    h = _host(torch.cat([done_rows[:B], mask[:B, :n].any(0)]))  # (B + n,) which rows stopped, which columns any row reached
    Tn = int(h[B:].nonzero().max()) + 1 if h[B:].any() else 0  # drop columns no row reached
    if stats is not None:  # decode forwards, rows, sum of rows x key columns attention read, tokens, compiled shapes
        new = dict(steps=steps, row_steps=row_steps, key_cols=key_cols, tokens=int(_host(mask[:B].sum())),
                   graphs=len(shapes) if decode_fn else 0)
        stats.update({key: stats.get(key, 0) + v for key, v in new.items()})
    return Rollout(prompt_ids, prompt_mask, tokens[:B, :Tn], mask[:B, :Tn], logp[:B, :Tn],
                   ["eos" if e else "length" for e in h[:B].tolist()])


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
