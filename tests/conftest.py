"""Shared fixtures: SmolLM2 loaded once per session (ours and transformers'), and tiny random HF models in Llama,
Qwen2 and Qwen3 flavours written to temporary directories with a byte-level tokenizer that has a chat template."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A 259-token byte-level tokenizer (no merges) with <|im_start|>, <|im_end|>, <pad> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(sorted(alphabet))})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_tiny(path, arch="llama", seed=0, favour=(), **overrides):
    """Save a tiny random transformers model of the given family, plus the byte tokenizer, to `path`.
    favour: tokens (strings) the model should emit often, so RL tests get mixed rewards (llama only: untied head)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    tok = byte_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    if arch == "llama":  # untied, with Llama-3 rope scaling
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                            original_max_position_embeddings=64))
    elif arch == "qwen2":  # tied, q/k/v biases
        cfg = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
    else:  # qwen3: q/k norms and a head_dim that is not hidden/heads
        cfg = Qwen3Config(**common, tie_word_embeddings=True, head_dim=32)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random biases and norm weights so they are really tested
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
        if favour:  # a constant feature in every embedding, read out by the head rows of the favoured tokens
            m.model.embed_tokens.weight[:, 0] = 5.0
            m.lm_head.weight[:, 0] = 0.0
            m.lm_head.weight[[tok.convert_tokens_to_ids(t) for t in favour], 0] = 1.5
    m.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: tiny_dir("qwen2") -> directory of a saved tiny model (cached per arch)."""
    made = {}

    def get(arch="llama"):
        if arch not in made:
            made[arch] = make_tiny(tmp_path_factory.mktemp(f"tiny_{arch}"), arch)
        return made[arch]
    return get


@pytest.fixture(scope="session")
def smol():
    from model import from_pretrained
    return from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smol():
    from transformers import AutoModelForCausalLM
    from model import default_gguf_path
    p = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32).eval()


def chat_ids(tok, texts):
    import model
    return [model.chat_ids(tok, t) for t in texts]
