"""plan.py's byte accounting of a decode step (used by bench.py's accounting table and the GPU check) against numbers
worked out by hand, for a tiny config and for Qwen2.5-Math-1.5B; bench.simulate's counters on a schedule traced by
hand. Arithmetic only: no model runs. Run: python -m pytest -q tests/test_plan.py"""
import pytest

import bench
import plan

# a llama of 2 blocks: dim 64, 4 heads / 2 kv heads of 16, SwiGLU 128, vocab 1000
TINY = dict(model_type="llama", vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)


def test_tiny_by_hand():
    # params (tied): embedding 64000 + 2 x (norms 128 + q 4096 + k 2048 + v 2048 + o 4096 + mlp 24576) + 64 = 138048
    assert plan.weights_read(TINY) == 2 * 138048  # an HF config dict or a ModelConfig
    assert plan.weights_read(plan.shape(TINY), w_bytes=4) == 4 * 138048
    # untied: the input embedding is a gather of B rows, not read whole; the lm_head (64000) is
    assert plan.weights_read(dict(TINY, tie_word_embeddings=False)) == 2 * (138048 + 64000 - 64000)
    assert plan.kv_col_bytes(TINY) == 2 * 2 * 2 * 16 * 2 == 256  # K and V x 2 blocks x 2 kv heads x 16 x bf16
    r = plan.decode_roofline(TINY, rows=3, cols=100)
    assert r == dict(weights=276096, kv_read=3 * 100 * 256, kv_write=3 * 256, logits=3 * 1000 * 4,
                     total=276096 + 76800 + 768 + 12000)
    # a run's counters: 10 decode forwards over 30 row-steps, 3000 key columns read, 27 tokens
    st = dict(steps=10, row_steps=30, tokens=27, key_cols=3000, graphs=2)
    mv = plan.decode_moved(TINY, st)
    total = 10 * 276096 + 3000 * 256 + 30 * 256 + 30 * 1000 * 4
    assert mv["total"] == total == 3656640 and mv["per_token"] == total / 27 and mv["util"] == 0.9
    assert plan.decode_moved(TINY, st, w_bytes=4, kv_bytes=4, logit_bytes=2)["total"] == (
        10 * 552192 + 3000 * 512 + 30 * 512 + 30 * 1000 * 2)
    # live columns per generated token: row 1 (prompt 10, 3 tokens) reads 10, 11, 12; row 2 (prompt 20, 1 token) 20
    assert plan.live_cols([10, 20], [3, 1]) == (10 + 11 + 12 + 20) / 4


def test_qwen_math_1_5b_by_hand():
    m = plan.model_config("Qwen/Qwen2.5-Math-1.5B")
    # per layer: q 1536^2 + 1536 bias, k and v 1536 x 256 + 256 each, o 1536^2, mlp 3 x 1536 x 8960, norms 2 x 1536
    # = 46,797,824; x 28 + tied embedding 151936 x 1536 + final norm 1536 = 1,543,714,304 params: 3.09 GB in bf16
    assert plan.weights_read(m) == 2 * (28 * 46797824 + 151936 * 1536 + 1536) == 3087428608
    assert plan.kv_col_bytes(m) == 28 * 2 * 2 * 128 * 2 == 28672  # gpu-audit's 28.7 KB a token
    r = plan.decode_roofline(m, rows=256, cols=600)
    assert r["kv_read"] == 256 * 600 * 28672 == 4404019200 and r["logits"] == 256 * 151936 * 4
    assert r["total"] == 3087428608 + 4404019200 + 256 * 28672 + 155582464 == 7654370304
    # H100 3.35 TB/s, H200 4.8 TB/s: 256 tokens per 7.654 GB
    assert plan.tokens_per_s(r["total"] / 256, "h100") == pytest.approx(256 / (7654370304 / 3.35e12)) == \
        pytest.approx(112041, abs=1)
    assert plan.tokens_per_s(r["total"] / 256, "h200") == pytest.approx(256 / (7654370304 / 4.8e12))


def test_simulate_by_hand():
    # rows of 3, 5, 2 tokens (the first of each from the prefill) in 2 slots, host check every step: row 0 runs
    # decode steps 0-1 in slot 0, row 1 steps 0-3 in slot 1, row 2 takes slot 0 at step 2 (the queue empties) and
    # runs step 2; steps 2-3 are compacted: 2 live rows -> 2 slots, then 1 -> 1
    st = bench.simulate([3, 5, 2], prompt=4, R=2, width=10, sync=1)
    assert st == dict(steps=4, row_steps=2 + 2 + 2 + 1, tokens=10, key_cols=7 * 10, graphs=2)
    # own columns in blocks of 4: row 0 reads 5, 6 -> 8, 8; row 1 5..8 -> 4 x 8; row 2 5 -> 8
    assert bench.simulate([3, 5, 2], prompt=4, R=2, width="row", block=4, sync=1)["key_cols"] == 16 + 32 + 8
    # host check every 4 steps: slot 0 frees at step 4, so row 2 runs step 4, the batch idles a slot for 2 steps
    st = bench.simulate([3, 5, 2], prompt=4, R=2, width=10, sync=4)
    assert st["steps"] == 5 and st["row_steps"] == 2 * 4 + 1
    lens = bench.paper_lens(2048)
    assert sum(lens) / len(lens) == pytest.approx(768, abs=0.5) and lens.count(3072) == 205 and max(lens) == 3072


def test_accounting_targets():
    """The accounting table's figures: a block-sparse sampler that reads each row's own columns is within 1.3x of
    the roofline at 256 and 1024 rows; one that reads the whole static cache width is not."""
    rows, S = bench.accounting_rows()
    assert S == 3328 and [r["rows"] for r in rows] == [256, 1024]
    for r in rows:
        assert r["blocks"]["ratio"] <= 1.3 < r["static"]["ratio"], r
        assert r["blocks"]["stats"]["graphs"] <= 11  # power-of-two buckets up to 1024
        assert r["h200"] / r["h100"] == pytest.approx(4.8 / 3.35)


def test_mbu():
    # 7.654 GB moved in 4.569 ms on an H100 (3.35 TB/s) is 50% of its bandwidth
    assert plan.mbu(7654370304, 7654370304 / 3.35e12 / 0.5, "h100") == pytest.approx(0.5)
