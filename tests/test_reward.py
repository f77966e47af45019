"""
Tests for reward.py: extraction, equivalence, adversarial inputs (fast, in any thread), truncation.

    python -m pytest -q tests/test_reward.py
"""

import os
import signal
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import reward
from reward import extract_answer, is_equiv, math_reward, normalize_answer

ALL = reward.FALLBACKS

# (completion, ground truth, fallbacks): each must score 1.0
EQUAL = [
    # GSM8K style
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", ("hash",)),
    ("So the total is 1,234 dollars.\n#### 1,234", "1234", ("hash",)),
    ("#### 1234", "1,234", ("hash",)),
    ("The answer is 72.", "72", ("last_number",)),
    ("She has 5 apples left, so the answer is -3.", "-3", ("last_number",)),
    ("It costs $1,000,000 in total.", "1000000", ("last_number",)),
    ("Half of it: 0.5", "1/2", ("last_number",)),
    ("The answer is 18.00", "18", ("last_number",)),
    # DAPO style
    ("Some work.\nAnswer: 34", "34", ("boxed", "answer")),
    ("Answer: $\\frac{1}{2}$", "0.5", ("answer",)),
    ("first guess\nAnswer: 3\nwait, no\nAnswer: 4", "4", ("answer",)),
    ("answer: \\boxed{7}.", "7", ("answer",)),
    # boxed, MATH style
    ("\\boxed{72}", "72", ("boxed",)),
    ("so $\\boxed{\\frac{3}{4}}$", "0.75", ("boxed",)),
    ("\\boxed{0.75}", "\\frac{3}{4}", ("boxed",)),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", ("boxed",)),
    ("\\boxed{\\tfrac34}", "\\frac{3}{4}", ("boxed",)),
    ("\\boxed{3/4}", "\\frac34", ("boxed",)),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", ("boxed",)),
    ("\\boxed{\\frac{-1}{2}}", "-\\frac{1}{2}", ("boxed",)),
    ("\\boxed{\\text{(B)}}", "\\text{(B)}", ("boxed",)),
    ("\\boxed{\\text{(B)}}", "B", ("boxed",)),
    ("\\boxed{(B)}", "\\textbf{(B)}", ("boxed",)),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]", ("boxed",)),
    ("\\boxed{\\left(-\\infty, 3\\right]}", "(-\\infty, 3]", ("boxed",)),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", ("boxed",)),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt2}{2}", ("boxed",)),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", ("boxed",)),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", ("boxed",)),
    ("\\boxed{2\\pi}", "2 \\pi", ("boxed",)),
    ("\\boxed{30^\\circ}", "30", ("boxed",)),
    ("\\boxed{30^{\\circ}}", "30", ("boxed",)),
    ("\\boxed{25\\%}", "25", ("boxed",)),
    ("\\boxed{5 \\text{ cm}}", "5", ("boxed",)),
    ("\\boxed{18 \\text{ dollars}}", "18", ("boxed",)),
    ("\\boxed{18 dollars}", "18", ("boxed",)),
    ("\\boxed{\\$18}", "18", ("boxed",)),
    ("\\boxed{\\mbox{12 inches}}", "12", ("boxed",)),
    ("\\boxed{x = 5}", "5", ("boxed",)),
    ("\\boxed{-7}", "-7", ("boxed",)),
    ("\\boxed{1,\\!000}", "1000", ("boxed",)),
    ("\\boxed{12.0}", "12", ("boxed",)),
    ("\\boxed{.5}", "\\frac{1}{2}", ("boxed",)),
    ("\\boxed{5.}", "5", ("boxed",)),
    ("\\boxed{\\frac{\\frac{1}{2}}{x}}", "\\frac{1}{2x}", ("boxed",)),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", ("boxed",)),
    ("nested \\boxed{\\sqrt{\\frac{x}{4}}}", "\\frac{\\sqrt{x}}{2}", ("boxed",)),
    ("\\boxed 7", "7", ("boxed",)),
    ("so $\\boxed 5$.", "5", ("boxed",)),
    ("\\fbox{8}", "8", ("boxed",)),
    ("first \\boxed{3}, no wait: \\boxed{4}", "4", ("boxed",)),
    ("\\boxed{3} then \\fbox{9}", "9", ("boxed",)),
    ("no box but the answer is 12", "12", ALL),
    ("\\boxed{} is empty; the result is 12", "12", ("boxed", "last_number")),
    ("\\boxed{\\text{odd}}", "\\text{odd}", ("boxed",)),
    ("\\boxed{10^{10}}", "10000000000", ("boxed",)),  # powers are plain numbers, exact at any size
    ("\\boxed{18446744073709551616}", "2^{64}", ("boxed",)),
    ("\\boxed{1.5 \\times 10^{3}}", "1500", ("boxed",)),
    ("\\boxed{2^{-3}}", "0.125", ("boxed",)),
    ("\\boxed{10^{400}}", "10^{400}", ("boxed",)),
]

# each must score 0.0
NOT_EQUAL = [
    ("\\boxed{73}", "72", ("boxed",)),
    ("\\boxed{12 + 7}", "19", ("boxed",)),      # echoing the question is not an answer
    ("\\boxed{\\sqrt{4}}", "2", ("boxed",)),    # numeric ground truth needs a plain number
    ("\\boxed{\\frac{\\frac{1}{2}}{3}}", "\\frac{1}{6}", ("boxed",)),
    ("\\boxed{0.74}", "\\frac{3}{4}", ("boxed",)),
    ("\\boxed{-5}", "5", ("boxed",)),
    ("\\boxed{\\text{(C)}}", "B", ("boxed",)),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty, 3]", ("boxed",)),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", ("boxed",)),
    ("\\boxed{\\sqrt{3}/2}", "\\frac{\\sqrt{2}}{2}", ("boxed",)),
    ("\\boxed{(x+1)^2}", "x^2+1", ("boxed",)),
    ("The answer is 72.", "72", ("boxed",)),    # no box and no fallback
    ("#### 72", "72", ("boxed",)),
    ("Answer: 72", "72", ("boxed", "hash")),
    ("\\boxed{72} and then 5", "5", ("boxed", "last_number")),  # boxed is tried first
    ("\\boxed{4}, no wait: \\boxed{3}", "4", ("boxed",)),
    ("", "1", ALL),
    ("\\boxed{}", "1", ("boxed",)),
    ("\\boxed{1", "1", ("boxed",)),
    ("\\boxed{1.5}", "1", ("boxed",)),
    ("\\boxed{1,2}", "12", ("boxed",)),         # a pair, not a thousands separator
    ("\\boxed{__import__('os').system('true')}", "0", ("boxed",)),
    ("\\boxed{x}", "y", ("boxed",)),
    ("\\boxed{-2^{2}}", "4", ("boxed",)),         # -(2^2)
    ("\\boxed{10^{401}}", "10^{400}", ("boxed",)),  # exact, no float overflow to inf
    ("\\boxed{10^{400}+1}", "10^{400}", ("boxed",)),
    ("\\boxed{\\infty}", "\\sqrt{2}", ("boxed",)),  # (the whole class: tests/test_reward_universal.py)
    ("\\boxed{0^{-1}}", "0", ("boxed",)),
]

@pytest.mark.parametrize("completion,answer,fallbacks", EQUAL)
def test_equal(completion, answer, fallbacks):
    assert math_reward(completion, answer, fallbacks) == 1.0, extract_answer(completion, fallbacks)

@pytest.mark.parametrize("completion,answer,fallbacks", NOT_EQUAL)
def test_not_equal(completion, answer, fallbacks):
    assert math_reward(completion, answer, fallbacks) == 0.0, extract_answer(completion, fallbacks)

@pytest.mark.parametrize("text,fallbacks,expected", [
    ("\\boxed{\\frac{1}{2}}", ("boxed",), "\\frac{1}{2}"),
    ("\\boxed{a{b{c}}d}", ("boxed",), "a{b{c}}d"),
    ("\\boxed{\\{1, 2\\}}", ("boxed",), "\\{1, 2\\}"),
    ("\\boxed  {5}", ("boxed",), "5"),
    ("\\boxed 7 apples", ("boxed",), "7"),
    ("\\boxed{1} \\boxed{2", ("boxed",), None),  # last one is unterminated
    ("x\n#### 1,234\n", ("hash",), "1,234"),
    ("Answer: 5\nAnswer: 6.", ("answer",), "6"),
    ("The total is 3,000.", ("last_number",), "3,000"),
    ("between 3 and 4.5", ("last_number",), "4.5"),
    ("no numbers here", ("last_number",), None),
    ("Answer: 9", ("boxed", "hash"), None),
    ("Answer: 9", ("boxed", "hash", "answer"), "9"),
])
def test_extract_answer(text, fallbacks, expected):
    assert extract_answer(text, fallbacks) == expected

def test_unknown_fallback_is_an_error():
    with pytest.raises(ValueError, match="unknown answer fallback 'box'"):
        extract_answer("\\boxed{1}", ("box",))

def test_normalize_answer():
    assert normalize_answer(" \\left( 1, 2 \\right) ") == "(1,2)"
    assert normalize_answer("\\dfrac{1}{2}") == normalize_answer("\\frac12") == "\\frac{1}{2}"
    assert normalize_answer("1,000.00") == "1000"
    assert normalize_answer("x = \\text{(A)}") == "A"

def test_truncated():
    right = "The answer is \\boxed{5}"
    assert math_reward(right, "5") == 1.0
    assert math_reward(right, "5", truncated=True) == 0.0
    assert math_reward(right, "5", truncated=True, truncated_reward=-1.0) == -1.0
    assert math_reward("so \\boxed{", "5", truncated=True, truncated_reward=0.5) == 0.5

# -----------------------------------------------------------------------------
# adversarial inputs: 0.0 within 1 s, from the main thread and from a worker thread

def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    t.join(timeout=30)
    assert "r" in out, "reward call in a thread did not return"
    return out["r"]

RUNNERS = {"main": lambda fn: fn(), "thread": _in_thread}

ADVERSARIAL = {
    "10MB_digits": ("9" * 10_000_000, "1", ALL),
    "10MB_boxed": ("\\boxed{" + "1" * 10_000_000 + "}", "1", ALL),
    "10MB_text_then_box": ("a" * 10_000_000 + "\\boxed{2}", "1", ("boxed",)),
    "100k_nested_braces": ("\\boxed{" + "{" * 100_000 + "1" + "}" * 100_000 + "}", "1", ("boxed",)),
    "2k_nested_braces_in_tail": ("\\boxed{" + "{" * 2000 + "1" + "}" * 2000 + "}", "1", ("boxed",)),
    "100k_boxed_openers": ("\\boxed{" * 100_000, "1", ALL),
    "unterminated_boxed": ("The answer is \\boxed{1", "1", ("boxed",)),
    "power_tower_vs_1": ("\\boxed{10^{10^{10}}}", "1", ("boxed",)),
    "power_tower_vs_expr": ("\\boxed{10^{10^{10}}}", "x+1", ("boxed",)),
    "huge_exponent_vs_1": ("\\boxed{x^{99999999}}", "1", ("boxed",)),
    "huge_exponent_vs_x": ("\\boxed{x^{99999999}}", "x", ("boxed",)),
    "huge_exponent_nobrace": ("\\boxed{2^99999999}", "y", ("boxed",)),
    "giant_factorial_vs_1": ("\\boxed{(10^{100})!}", "1", ("boxed",)),
    "giant_factorial_vs_expr": ("\\boxed{(10^{100})!}", "y", ("boxed",)),
    "big_literal_factorial": ("\\boxed{99999999!}", "y", ("boxed",)),
    "python_power": ("\\boxed{9**9**9**9}", "y", ("boxed",)),
    "deep_parens": ("\\boxed{" + "(" * 50 + "x" + ")" * 50 + "}", "y", ("boxed",)),
    "hostile_ground_truth": ("\\boxed{y}", "10^{10^{10^{10}}}", ("boxed",)),
}

@pytest.fixture(scope="module")
def warm_worker():
    reward.warmup()  # start-up is paid once here, not inside the timed calls

@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("case", ADVERSARIAL)
def test_adversarial_fast(case, runner, warm_worker):
    completion, answer, fallbacks = ADVERSARIAL[case]
    t0 = time.perf_counter()
    r = RUNNERS[runner](lambda: math_reward(completion, answer, fallbacks))
    dt = time.perf_counter() - t0
    assert r == 0.0
    assert dt < 1.0, f"{case} took {dt:.2f}s"

@pytest.mark.parametrize("runner", RUNNERS)
def test_symbolic_path_works_in_a_thread(runner, warm_worker):
    # math_verify's signal.alarm would fail here; the worker process does not care (verl PR#5635)
    assert RUNNERS[runner](lambda: math_reward("\\boxed{\\{2,1\\}}", "\\{1,2\\}")) == 1.0

@pytest.mark.parametrize("runner", RUNNERS)
def test_timeout_scores_0_and_recovers(runner, warm_worker):
    # passes the cheap guards but sympy needs seconds to expand it: the hard limit must cut it off
    t0 = time.perf_counter()
    r = RUNNERS[runner](lambda: is_equiv("\\{(x+1)^{999}\\}", "\\{x^{999}+1\\}", timeout=0.25))
    dt = time.perf_counter() - t0
    assert r is False and dt < 1.0, f"took {dt:.2f}s"
    assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")  # a fresh worker answers the next call

def _pids():
    return sorted(p.pid for p in reward._pool)

def _until(cond, limit=30.0):  # (polls state that a background thread changes; never a timing assertion)
    t0 = time.perf_counter()
    while not cond() and time.perf_counter() - t0 < limit:
        time.sleep(0.05)
    return cond()

def test_timeout_keeps_the_worker(warm_worker):
    # the worker's own alarm stops sympy (at the limit or soon after, on a loaded machine): it is not killed,
    # so the next call pays no start-up; the timeout is counted
    pids, before = _pids(), reward.timeouts
    assert is_equiv("\\{(x+1)^{999}\\}", "\\{x^{999}+1\\}", timeout=1.0) is False
    assert reward.timeouts == before + 1
    assert _until(lambda: len(reward._idle) == reward.WORKERS)
    assert _pids() == pids
    t0 = time.perf_counter()
    assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}")
    assert time.perf_counter() - t0 < 1.0

@pytest.mark.parametrize("runner", RUNNERS)
def test_hung_worker_is_replaced_and_others_answer(runner, monkeypatch):
    # a worker stuck where its own alarm cannot reach (here: frozen): its call scores 0 at the limit, the other
    # workers answer the next calls at once, and it is killed HUNG_S later and replaced
    monkeypatch.setattr(reward, "HUNG_S", 0.5)
    reward.warmup()
    frozen = reward._idle[-1]  # the next call's worker
    os.kill(frozen.pid, signal.SIGSTOP)
    t0 = time.perf_counter()
    assert RUNNERS[runner](lambda: is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", timeout=0.5)) is False
    assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    assert RUNNERS[runner](lambda: is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"))
    assert time.perf_counter() - t0 < 1.0, f"took {time.perf_counter() - t0:.2f}s"
    assert _until(lambda: frozen.poll() is not None)  # killed
    assert frozen not in reward._pool and len(reward._pool) == reward.WORKERS  # a replacement is starting

def test_every_worker_killed_waits_for_a_start_up_not_a_wrong_verdict(monkeypatch):
    # with every worker hung and killed, the next call waits for a start-up (seconds) and its verdict stays right
    monkeypatch.setattr(reward, "HUNG_S", 0.1)
    reward.warmup()
    frozen = list(reward._pool)
    for p in frozen:
        os.kill(p.pid, signal.SIGSTOP)
    for _ in frozen:
        assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", timeout=0.3) is False
    assert _until(lambda: all(p.poll() is not None for p in frozen))
    assert not any(p.ready for p in reward._pool)
    assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", timeout=0.5)

def test_worker_that_cannot_start_is_one_clear_error(monkeypatch):
    reward._kill_all()
    monkeypatch.setattr(reward, "_WORKER_SRC", "raise SystemExit(1)")  # as if math_verify were not installed
    with pytest.raises(RuntimeError, match="pip install math-verify"):
        is_equiv("\\{1,2\\}", "\\{2,1\\}")
    assert reward._pool == []
    with pytest.raises(RuntimeError, match="pip install math-verify"):  # each call that needs it says so
        reward.warmup()
    monkeypatch.undo()
    assert is_equiv("\\{1,2\\}", "\\{2,1\\}")

def test_concurrent_threads(warm_worker):
    from concurrent.futures import ThreadPoolExecutor
    cases = [("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0), ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
             ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0), ("\\boxed{7}", "7", 1.0)] * 4
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda c: math_reward(c[0], c[1], timeout=10.0), cases))
    assert got == [c[2] for c in cases]

def test_threads_with_slow_inputs_wait_at_most_their_limit(warm_worker):
    # 8 threads, each with an input sympy needs seconds for, share WORKERS workers: every call returns by its
    # deadline, the time in the queue included (one worker behind one lock made the 8th wait 8 limits), scores
    # 0 and is counted in reward.timeouts; the pool is intact afterwards
    from concurrent.futures import ThreadPoolExecutor
    limit, before = 0.5, reward.timeouts
    def call(_):
        t0 = time.perf_counter()
        r = is_equiv("\\{(x+1)^{999}\\}", "\\{x^{999}+1\\}", timeout=limit)
        return r, time.perf_counter() - t0
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(call, range(8)))
    assert [r for r, _ in got] == [False] * 8
    assert max(dt for _, dt in got) < 3 * limit, got  # generous: the bound is the limit, not a speed target
    assert reward.timeouts == before + 8
    assert is_equiv("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", timeout=10.0)

def test_plain_answers_need_no_math_verify(tmp_path):
    # a bare GPU machine (torch + transformers only): reward.py imports and scores plain and synthetic answers
    # without starting a worker; an answer that needs math_verify gets one clear error, no worker traceback
    import subprocess
    (tmp_path / "math_verify.py").write_text("raise ImportError(\"No module named 'math_verify'\")\n")
    script = (
        "import sys, reward\n"
        "assert reward.math_reward('so \\\\boxed{42}', '42') == 1.0\n"
        "assert reward.math_reward('#### 1,234', '1234', ('hash',)) == 1.0\n"
        "assert reward.math_reward('the answer is 17', '18', reward.FALLBACKS) == 0.0\n"
        "assert reward.math_reward('\\\\boxed{\\\\frac{3}{4}}', '0.75') == 1.0\n"
        "assert reward.math_reward('\\\\boxed{2^{64}}', '18446744073709551616') == 1.0\n"
        "assert reward.math_reward('\\\\boxed{\\\\infty}', '7') == 0.0\n"
        "assert reward._pool == [] and 'sympy' not in sys.modules and 'math_verify' not in sys.modules\n"
        "try:\n"
        "    reward.math_reward('\\\\boxed{\\\\sqrt{2}}', '\\\\sqrt{2}/1')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{root}")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("reward: the math_verify worker process failed to start"), r.stdout
    assert "pip install math-verify" in r.stdout and r.stderr == "", r.stderr
