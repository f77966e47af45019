"""
Universal answers cannot earn the reward (issue 25): infinities, huge powers and factorials (a float overflows to
inf, and |inf - b| <= tol * inf holds for any b), nan/undefined, empty boxes, a bare variable, the reals, the empty
set, ... each scored against every gold of tests/universal_answers.jsonl, symbolic and numeric. Every pair scores 0
except the ones a row lists as truly equal ("equal"), which must score 1.

    python -m pytest -q tests/test_reward_universal.py
"""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import reward

with open(os.path.join(HERE, "universal_answers.jsonl"), encoding="utf-8") as f:
    ROWS = [json.loads(line) for line in f if line.strip()]
GOLDS = [r["gold"] for r in ROWS if "gold" in r]
PREDS = [r for r in ROWS if "pred" in r]

@pytest.fixture(scope="module")
def warm_worker():
    reward.warmup()

@pytest.mark.parametrize("row", PREDS, ids=[repr(r["pred"]) for r in PREDS])
def test_universal_answer_scores_0_unless_truly_equal(row, warm_worker):
    completion = "So the answer is \\boxed{" + row["pred"] + "}."
    # a generous limit: every pair gets a real verdict, not a timeout's 0 (threads: several workers at once)
    score = lambda gold: reward.math_reward(completion, gold, ("boxed", "last_number"), timeout=10.0)
    with ThreadPoolExecutor(4) as ex:
        got = dict(zip(GOLDS, ex.map(score, GOLDS)))
    wrong = {g: s for g, s in got.items() if s != (1.0 if g in row["equal"] else 0.0)}
    assert not wrong, f"{row['pred']!r} scores {wrong} (truly equal only to {row['equal']})"
