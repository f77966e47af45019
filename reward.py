"""
Math-answer reward: 1.0 if a completion's final answer equals the ground truth, else 0.0.

    from reward import math_reward
    math_reward("... so the answer is \\boxed{\\frac{3}{4}}.", "0.75")  # -> 1.0

Cheapest first, so the common case never leaves this process:
  1. extract the last \\boxed{...} / \\fbox{...} from the end of the completion, then any fallbacks asked for:
     "answer" (DAPO's last "Answer: x" line), "hash" (GSM8K "#### x"), "last_number".
  2. normalise Hendrycks-MATH style ($, spaces, \\left, \\text{}, units, 1,000, \\dfrac, .0, ^\\circ, \\%) and compare.
  3. plain numbers (int, decimal, a/b, \\frac{a}{b}) compare exactly. A numeric ground truth needs a plain-number
     prediction, so \\boxed{12+7} does not earn the reward for "What is 12 + 7?".
  4. anything else (intervals, sets, sqrt, expressions) goes to math_verify in a persistent worker process with a
     hard wall-clock limit. math_verify's own limit uses signal.alarm, which only works in the main thread
     (Math-Verify#50, verl PR#5635): we turn it off and kill the worker on timeout. Timeouts score 0.
Model output is never eval'ed. Inputs are capped before any regex work, and answers hostile to sympy (power
towers, huge exponents, factorials of expressions, deep nesting) score 0 without reaching it.
"""

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from fractions import Fraction

MAX_TAIL_CHARS = 4096    # only the end of a completion is searched for the answer
MAX_ANSWER_CHARS = 300   # longer extracted answers score 0 (no ground truth is this long)
MAX_DEPTH = 10           # brace/paren nesting allowed in an answer
TIMEOUT_S = 1.0          # wall-clock limit for one math_verify comparison (oat uses 1 s too)
STARTUP_TIMEOUT_S = 60.0 # worker start-up (imports sympy) is not counted in TIMEOUT_S
FALLBACKS = ("boxed", "answer", "hash", "last_number")

# -----------------------------------------------------------------------------
# extraction

def _close_brace(text, k):
    """Index of the } closing the group opened just before k, or -1 (unterminated or nested too deep)."""
    depth = 1
    while k < len(text):
        c = text[k]
        if c == "\\":  # \{ and \} are set braces, not grouping
            k += 1
        elif c == "{":
            depth += 1
            if depth > MAX_DEPTH:
                return -1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return k
        k += 1
    return -1

def _last_boxed(text):
    i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if i < 0:
        return None
    j = i + (6 if text.startswith("\\boxed", i) else 5)
    m = re.match(r"\s*\{", text[j:j + 64])
    if m is None:  # "\boxed 7": the next token
        m = re.match(r"\s+([^\s$]+)", text[j:j + MAX_ANSWER_CHARS])
        return m.group(1) if m else None
    end = _close_brace(text, j + m.end())
    return text[j + m.end():end] if end >= 0 else None  # unterminated: the completion was cut off

_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")
_HASH_LINE = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")

def _last_match(pattern, text):
    found = pattern.findall(text)
    return found[-1].strip() if found else None

def extract_answer(text, fallbacks=("boxed",)):
    """The final answer in text (a str) or None: the first of `fallbacks` (names in FALLBACKS) that finds one."""
    text = text[-MAX_TAIL_CHARS:]  # bounds all the work below, whatever the completion length
    for name in fallbacks:
        if name == "boxed":
            ans = _last_boxed(text)
        elif name in ("answer", "hash"):
            ans = _last_match(_ANSWER_LINE if name == "answer" else _HASH_LINE, text)
            if ans is not None:  # "Answer: $\boxed{5}$." -> 5
                ans = _last_boxed(ans) or ans.strip("$ .")
        elif name == "last_number":
            ans = _last_match(_NUMBER, text)
        else:
            raise ValueError(f"unknown answer fallback {name!r}: choose from {', '.join(FALLBACKS)}")
        if ans and ans.strip():
            return ans.strip()
    return None

# -----------------------------------------------------------------------------
# normalisation and cheap comparisons

_UNITS = (r"dollars?|cents?|units?|cm|mm|km|meters?|inch(?:es)?|feet|foot|ft|miles?|mph|hours?|minutes?|"
          r"seconds?|days?|weeks?|months?|years?|degrees?|points?|square|sq|cubic|percent")
_TRAILING_UNITS = re.compile(rf"(?<=\d)\s*(?:(?:{_UNITS})\b(?:\^\{{?\d\}}?)?\s*)+$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf)\s*\{([^{}]*)\}")

def normalize_answer(s):
    """Hendrycks-MATH-style canonical string of an answer (used for exact string comparison)."""
    s = s.strip().replace("\n", "").replace("\u2212", "-")
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\displaystyle", ""),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""), ("\\%", ""), ("%", ""),
                     ("\\$", ""), ("$", "")):
        s = s.replace(old, new)
    if "\\text{ " in s[1:]:  # units: "5 \text{ cm}" -> "5"
        s = s[:s.index("\\text{ ", 1)]
    for _ in range(3):  # \text{\textbf{(B)}} -> (B)
        s = _TEXT_CMD.sub(r"\1", s)
    s = _TRAILING_UNITS.sub("", s).strip().rstrip(".").strip()
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5" -> "5"
        s = parts[1]
    s = s.replace(" ", "")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)           # \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)   # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):    # 1,000 -> 1000 (but not the set 1,2)
        s = s.replace(",", "")
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)                # 12.00 -> 12
    s = re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)           # .5 -> 0.5
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)                 # multiple choice "(B)" -> "B"
    return m.group(1).upper() if m else s

def _to_number(s):
    """Exact value of a normalised plain number (int, decimal, a/b, \\frac{a}{b}) or None."""
    m = re.fullmatch(r"-?\d+(?:\.\d+)?", s)
    if m:
        return Fraction(s)
    m = (re.fullmatch(r"(-?)(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", s)
         or re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s))
    if m and Fraction(m.group(3)) != 0:
        value = Fraction(m.group(2)) / Fraction(m.group(3))
        return -value if m.group(1) else value
    return None

def _sympy_safe(s):
    """False for answers that could make sympy run for minutes or eat memory."""
    if len(s) > MAX_ANSWER_CHARS or "**" in s:
        return False
    depth = 0
    for c in s:
        depth += (c in "{([") - (c in "})]")
        if depth > MAX_DEPTH:
            return False
    for m in re.finditer(r"\^\s*(\{)?", s):  # exponents: no towers, no factorials, at most 3 digits
        if m.group(1):
            end = _close_brace(s, m.end())
            exp = s[m.end():] if end < 0 else s[m.end():end]
        else:  # x^2, and x^99999999 which math_verify may read as one exponent
            exp = re.match(r"\d*.?", s[m.end():]).group()
        if "^" in exp or "!" in exp or re.search(r"\d{4,}", exp):
            return False
    # factorials only of small literals: 5! is fine, (10^{100})! and n! are not attempted
    return all(1 <= len(m.group(1)) <= 3 for m in re.finditer(r"(\d*)!", s))

# -----------------------------------------------------------------------------
# math_verify in a worker process with a hard time limit

# A fresh interpreter (not fork: the trainer has torch threads; not multiprocessing spawn: it would re-run a
# flat train.py script in the child). JSON lines in, "1"/"0" lines out.
_WORKER_SRC = r"""
import json, logging, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
out = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)  # stray prints must not corrupt the protocol
logging.disable(logging.CRITICAL)  # math_verify warns that its own timeouts are off
from math_verify import parse, verify
def check(gold, pred):
    g = parse("$" + gold + "$", parsing_timeout=None)
    p = parse("$" + pred + "$", parsing_timeout=None)
    return bool(g) and bool(p) and verify(g, p, timeout_seconds=None)
check("x^2+2x+1", "(x+1)^2")  # load the LaTeX parser and sympy's simplify before reporting ready
out.write(b"ready\n")
for line in sys.stdin.buffer:
    try:
        ok = check(*json.loads(line))
    except Exception:
        ok = False
    out.write(b"1\n" if ok else b"0\n")
"""
_lock = threading.Lock()  # one request in flight at a time; callers in other threads wait
_proc = None

def _readline(proc, timeout):
    # select() rather than a blocking read, so the limit holds in any thread. Each reply is one small
    # write, which a pipe delivers whole; b"" means the worker died.
    if not select.select([proc.stdout], [], [], timeout)[0]:
        return None
    return os.read(proc.stdout.fileno(), 64).strip() or None

def _kill():
    global _proc
    if _proc is not None:
        _proc.kill()
        _proc.wait()
        _proc.stdin.close()
        _proc.stdout.close()
        _proc = None

def _ensure_worker():
    global _proc
    if _proc is not None and _proc.poll() is None:
        return
    _kill()
    _proc = subprocess.Popen([sys.executable, "-c", _WORKER_SRC], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)
    atexit.unregister(_kill)  # (the worker also exits by itself when our end of its stdin closes)
    atexit.register(_kill)
    if _readline(_proc, STARTUP_TIMEOUT_S) != b"ready":
        _kill()
        raise RuntimeError("reward: the math_verify worker process failed to start; "
                           "check that `python -c 'import math_verify'` works (pip install math-verify)")

def warmup():
    """Start the math_verify worker now (~1 s) rather than on the first symbolic comparison."""
    with _lock:
        _ensure_worker()

def _verify(gold, pred, timeout):
    with _lock:
        _ensure_worker()
        try:
            _proc.stdin.write(json.dumps([gold, pred]).encode() + b"\n")
        except OSError:
            _kill()
            return False
        reply = _readline(_proc, timeout)
        if reply is None:  # too slow (or crashed): kill it, the next call starts a fresh one
            _kill()
            return False
        return reply == b"1"

# -----------------------------------------------------------------------------
# public entry points

def is_equiv(pred, gold, timeout=TIMEOUT_S):
    """True if the answer strings pred and gold are mathematically equal (see the module docstring)."""
    pred, gold = str(pred), str(gold)
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p and p == g:
        return True
    gold_num = _to_number(g)
    if gold_num is not None:  # numeric ground truth: exact numeric comparison only
        return _to_number(p) == gold_num
    pred, gold = pred.replace("\\!", ""), gold.replace("\\!", "")
    if not (_sympy_safe(pred) and _sympy_safe(gold)):
        return False
    return _verify(gold, pred, timeout)

def math_reward(completion, answer, fallbacks=("boxed",), truncated=False, truncated_reward=0.0,
                timeout=TIMEOUT_S):
    """
    Reward in {0.0, 1.0} for one completion against the ground-truth answer string.
    fallbacks: extractors tried in order (see FALLBACKS); the default accepts only \\boxed{} answers.
    truncated: the completion hit the length limit without EOS; it scores truncated_reward (0 by default),
    whatever it contains. timeout: seconds allowed for the math_verify comparison; a timeout scores 0.
    """
    if truncated:
        return float(truncated_reward)
    pred = extract_answer(completion, fallbacks)
    return 1.0 if pred is not None and is_equiv(pred, answer, timeout) else 0.0
