"""
reward.py against peer graders' own test cases (tests/reward_cases.jsonl: gold, pred or completion, expected,
source = repo + path of the case; note = why, where the peers disagree and reward.py's docstring chooses).

    python -m pytest -q tests/test_reward_corpus.py
"""

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import reward

with open(os.path.join(HERE, "reward_cases.jsonl"), encoding="utf-8") as f:
    CASES = [json.loads(line) for line in f if line.strip()]

@pytest.fixture(scope="module")
def warm_worker():
    reward.warmup()

@pytest.mark.parametrize("case", CASES, ids=[f"{i}:{c['source'].split()[0]}" for i, c in enumerate(CASES)])
def test_case(case, warm_worker):
    if "pred" in case:
        got = reward.is_equiv(case["pred"], case["gold"])
    else:
        got = reward.math_reward(case["completion"], case["gold"]) == 1.0
    assert int(got) == case["expected"], (case, reward.normalize_answer(case.get("pred", "")))
