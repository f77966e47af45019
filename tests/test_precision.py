"""Lower-precision sampling (issue 12): rollout.Bf16Emulation against real bf16 autocast, and train.py's
--sample_dtype / --old_logp / --tis_cap / --dual_clip wired end to end on a tiny model.
Run: python -m pytest -q tests/test_precision.py"""
import re

import pytest
import torch

from conftest import chat_ids
from model import from_pretrained
from rollout import Bf16Emulation, attn_mask, generate, left_pad
from test_train import one_error_line, params, run, setup, steps  # noqa: F401 (setup is a fixture)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return from_pretrained(tiny_dir("llama"))


def logits(model, ids, valid):
    pos = (valid.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, pos, attn_mask(valid, 0, ids.size(1))).float()  # (B, T, V)


def test_emulation_is_as_far_from_autocast_as_autocast_from_fp32(tiny):
    """The docstring's claim: Bf16Emulation moves the logits off fp32 by bf16's rounding (not 0, not more), and lands
    about as close to real autocast as autocast is to fp32. Fails if the emulation rounds nothing or far too much."""
    model, tok = tiny
    ids, valid = left_pad(chat_ids(tok, ["What is 7 + 12?", "a longer prompt, with some words"]), 0, "cpu")
    fp32 = logits(model, ids, valid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = logits(model, ids, valid)
    with Bf16Emulation():
        emul = logits(model, ids, valid)
    d_real, d_emul, d_between = [(a - b).abs().mean().item() for a, b in ((real, fp32), (emul, fp32), (emul, real))]
    assert d_emul > 1e-4 and d_real > 1e-4  # both really round
    assert 0.2 < d_emul / d_real < 5 and d_between < 2 * d_real, (d_real, d_emul, d_between)


def test_emulation_reads_live_weights_each_block(tiny):
    """The rounded weights are made once per `with` block: a later block sees an optimizer's in-place update."""
    model, tok = tiny
    prompts = chat_ids(tok, ["hello", "abc"])
    with Bf16Emulation():
        a = generate(model, prompts, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    try:
        with Bf16Emulation():
            b = generate(model, prompts, max_new_tokens=8, temperature=0)
    finally:
        with torch.no_grad():
            model.lm_head.weight.mul_(-1)
    assert not torch.equal(a.tokens, b.tokens)


def mismatch(out):
    """(mean, max, k3) of the sampler/trainer mismatch on each step line of the log."""
    return [tuple(map(float, m.groups())) for m in
            (re.search(r"mismatch (\S+) max (\S+) k3 (\S+)", s) for s in steps(out))]


def test_fp32_recompute_equals_the_samplers_logp(setup, tmp_path):
    """fp32 sampling: the trainer's recomputed old_logp is the sampler's own to float noise, so --old_logp=recompute
    trains to the same parameters and the logged mismatch is ~1e-6. Fails if recompute scored other tokens, another
    layout or another temperature."""
    a, b = tmp_path / "sampler", tmp_path / "recompute"
    assert run(setup, a, "--sample_dtype=float32").returncode == 0
    p = run(setup, b, "--sample_dtype=float32", "--old_logp=recompute")
    assert p.returncode == 0, p.stderr[-2000:]
    for mean, mx, _ in mismatch(a) + mismatch(b):
        assert mean < 1e-5 and mx < 1e-4
    pa, pb = params(a), params(b)  # Adam at lr 1e-3 moves a weight ~1e-3 an update; float noise stays far below it
    assert max((pa[n] - pb[n]).abs().max().item() for n in pa) < 1e-4


def test_bf16_emulated_sampling_logs_its_mismatch_and_tis(setup, tmp_path):
    """bfloat16_emul sampling against the fp32 trainer: the mismatch is bf16-sized and logged; --tis_cap with
    --old_logp=recompute logs its weight (near 1) and the share of capped tokens; --dual_clip logs how often it binds."""
    p = run(setup, tmp_path, "--sample_dtype=bfloat16_emul", "--old_logp=recompute", "--tis_cap=2", "--dual_clip=3")
    assert p.returncode == 0, p.stderr[-2000:]
    mm = mismatch(tmp_path)
    assert len(mm) == 2 and all(1e-4 < mean < 1 and mx >= mean for mean, mx, _ in mm), mm
    for line in steps(tmp_path):
        tis = float(re.search(r"\| tis (\S+)", line).group(1))
        assert 0.5 < tis < 1.5 and "tis_capped " in line and "clip_dual " in line


@pytest.mark.parametrize("args,expect", [
    (["--sample_dtype=fp8"], "--sample_dtype='fp8': expected one of"),
    (["--old_logp=trainer"], "--old_logp='trainer': expected one of"),
    (["--tis_cap=2"], "with --old_logp=recompute"),
    (["--tis_cap=-1", "--old_logp=recompute"], "a cap >= 0"),
    (["--dual_clip=0.5"], "0 (off) or a cap c > 1"),
    (["--algo=dpo", "--old_logp=recompute"], "are GRPO options"),
    (["--fsdp=True", "--dtype=bfloat16", "--sample_dtype=float32"], "FSDP gathers the weights in bf16"),
])
def test_bad_precision_flags(setup, tmp_path, args, expect):
    assert expect in one_error_line(run(setup, tmp_path, *args))
