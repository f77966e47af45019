"""
Math-answer reward: 1.0 if a completion's final answer equals the ground truth, else 0.0.

    from reward import math_reward
    math_reward("... so the answer is \\boxed{\\frac{3}{4}}.", "0.75")  # -> 1.0

Cheapest first, so the common case never leaves this process:
  1. extract the last \\boxed{...} / \\fbox{...} from the end of the completion, then any fallbacks asked for:
     "answer" (DAPO's last "Answer: x" line), "hash" (GSM8K "#### x"), "last_number".
  2. clean up ($, \\left, \\dfrac/\\cfrac, {,}, trailing units and \\text, ^\\circ, \\%, "and"/"or" lists), normalise
     (spaces, 1,000, .0, "x =") and compare the strings.
  3. plain numbers (int, decimal, a/b, \\frac{a}{b}, mixed 1 1/2, powers 2^{64} and 1.5\\times10^{3}) compare
     exactly, whatever their size. A numeric ground truth needs a plain-number prediction, so \\boxed{12+7} does
     not earn the reward for "What is 12 + 7?".
  4. anything else (intervals, sets, sqrt, expressions) goes to math_verify in a pool of WORKERS processes. Only a
     parse that read the whole answer counts (math_verify reads "1 - \\frac{1}{\\mathrm{e}}" as 1). Expressions and
     equations are first compared at 3 fixed random points (sympy's simplify can take seconds), in sympy numbers, not
     floats (10^{400} and 999! would be inf, and |inf - b| <= tol * inf holds for every b): rationals exactly, inf
     and nan equal only the same infinity, and a tolerance is relative to finite values. A call gets `timeout`
     seconds, the wait for a free worker included: past it, it scores 0 at once and counts in reward.timeouts (log
     it). The worker stops itself with an alarm (in its own main thread: math_verify's signal.alarm fails in the
     caller's threads, Math-Verify#50, verl PR#5635); one silent HUNG_S longer is killed and replaced. Start-ups
     (seconds) are not counted: only a call that finds every worker starting waits for one. Steps 1-3 need no
     math_verify; without it, step 4 raises one RuntimeError that says so.
Model output is never eval'ed. Inputs are capped before any regex work, and answers hostile to sympy (power
towers, huge exponents, factorials of expressions, deep nesting) score 0 without reaching it.

Conventions where graders disagree (tests/reward_cases.jsonl holds a case of each, with the peers' verdicts):
  - several boxes: the last one is the answer (Math-Verify joins them into a set).
  - numbers are exact: 0.333 != 1/3 and 3.14 != pi (Math-Verify rounds to 6 digits, MARIO and Qwen compare with
    a tolerance); 0.75 == 3/4 and 2.5 == 5/2 exactly. A decimal ground truth needs a plain number.
  - "A \\approx B": A, unless A is a variable name ("x \\approx 11" is 11).
  - commas: "1,000" and "1 000" are thousands separators (exactly 3 digits after each), "32, 349" and "1,2" are
    lists; decimal commas ("1,5") are not read (Math-Verify reads them).
  - "1 1/2" and "3\\frac18" are mixed numbers (3/2, 25/8), as MATH writes them; "2x = 5" stays an equation (only
    a variable name, "x", "a_3", "f(x)", left of "=" is dropped; minerva drops any left side).
  - 10\\% is 10 (MARIO also accepts 0.1); units and words after a number are dropped ("5 \\text{ cm}", "9 cm"),
    but a word inside the answer is kept ("6 \\text{ and } 8" is the list 6, 8); "10cm" without a space is kept.
  - "(5)" is 5; "(B)" and "(b)" are the option B; i is the imaginary unit.
  - universal answers earn nothing: \\infty, 10^{400}, NaN, an empty box or a bare x score 0 against anything but
    themselves (tests/universal_answers.jsonl); 2\\infty == \\infty (the same infinity), \\pm\\infty is not
    (-\\infty, \\infty) (Math-Verify reads an interval (a, b) as the pair a, b too).
"""

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction

MAX_TAIL_CHARS = 4096    # only the end of a completion is searched for the answer
MAX_ANSWER_CHARS = 300   # longer extracted answers score 0 (no ground truth is this long)
MAX_DEPTH = 10           # brace/paren nesting allowed in an answer
TIMEOUT_S = 1.0          # wall-clock limit for one math_verify comparison (oat uses 1 s too)
ALARM_FRACTION = 0.9     # the worker stops a comparison itself at this share of the time left (stays warm)
STARTUP_TIMEOUT_S = 60.0 # worker start-up (imports sympy) is not counted in TIMEOUT_S
HUNG_S = 5.0             # a worker still silent this long after its call's deadline is killed and replaced
WORKERS = max(2, min(4, os.cpu_count() or 1))  # math_verify processes (~70 MB each); 2: a spare when one is killed
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
          r"seconds?|days?|weeks?|months?|years?|degrees?|points?|square|sq|cubic|percent|pct")
_TEXT = r"\\(?:text|textbf|textrm|textnormal|textit|mbox|mathrm|mathbf)\s*"
_TEXT_CMD = re.compile(_TEXT + r"\{([^{}]*)\}")
_TRAILING_TEXT = re.compile(  # "5\text{ cm}^2", "6.5 \mathrm{~m}", but not the constant in 2\mathrm{e}
    r"(?<=[\d}])\s*(?:\\(?:text\w*|mbox)\s*\{[^{}]*\}|\\mathrm\s*\{(?:[\s~][^{}]*|[^{}]{2,})\})(?:\^\{?\d\}?)?\s*\.?$")
_TRAILING_UNITS = re.compile(rf"(?<=[\d}}])\s+(?:(?:{_UNITS})\b\.?(?:\^\{{?\d\}}?)?\s*)+$")  # "\frac{9}{2} cm"
_AND_OR = re.compile(r"\s*,?\s*(?:" + _TEXT + r"\{\s*,?\s*(?:and|or)\s*\}|(?<![\\\w])(?:and|or)(?!\w))\s*")
_VARIABLE = r"\s*(?:(?:\\[a-zA-Z]+|[a-zA-Z])(?:_\{?\w+\}?)?|[a-zA-Z]\([a-z]\))\s*"  # x, a_3, \theta, f(x); not \cos(x)

def _clean(s):
    """Meaning-preserving clean-up of an answer (spaces kept): what both the string compare and math_verify see."""
    s = re.sub(r",\s*\\!\s*", ",", s.strip().replace("\n", " ").replace("\u2212", "-"))  # 11,\! 111 is 11,111
    for old, new in (("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\displaystyle", ""), ("{,}", ","),
                     ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\u00b0", ""), ("\\%", ""), ("%", ""),
                     ("\\$", ""), ("$", ""), ("!=", "\\neq "), ("\\varnothing", "\\emptyset")):
        s = s.replace(old, new)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, "\\ " a matrix row break
    s = _TRAILING_TEXT.sub("", s)  # units and words after the answer: "5 \text{ cm}", "240\text{ ways.}"
    s = _AND_OR.sub(", ", s)  # "6 \text{ and } 8", "2, 3, and 4" are lists
    for _ in range(3):  # \text{\textbf{(B)}} -> (B); \mathrm{e} -> e, so math_verify reads all of 2\mathrm{e}
        s = _TEXT_CMD.sub(r"\1", s)
    s = _TRAILING_UNITS.sub("", s).strip().rstrip(".").strip()
    s = re.sub(r"^all real numbers$", r"\\mathbb{R}", s)
    s = re.sub(r"\\sqrt(\[\w+\])?(\w)", r"\\sqrt\1{\2}", s.strip())  # \sqrt2 -> \sqrt{2}, \sqrt[3]2 -> \sqrt[3]{2}
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac{1}2
    if re.fullmatch(r"\([^(),]*[^(),A-Za-z\s][^(),]*\)", s):  # "(5)", "(\frac{1}{3})": one value in brackets
        s = s[1:-1].strip()                                   # (a pair, "(B)" and "(x)" keep them)
    return re.sub(r"^\+\s*(?=\d)", "", s)  # +5 -> 5

def normalize_answer(s):
    """Hendrycks-MATH-style canonical string of an answer (used for exact string comparison)."""
    s = _clean(s)  # (math_verify reads "x = 5" and "\approx" itself: these two are for the string compare)
    if "\\approx" in s:  # "\frac{\sqrt3}{3} \approx 0.577": the exact form; "x \approx 11": the value
        left, right = s.split("\\approx", 1)
        s = (right if re.fullmatch(_VARIABLE, left) else left).strip()
    parts = s.split("=")
    if len(parts) == 2 and re.fullmatch(_VARIABLE, parts[0]):  # "x = 5" -> "5", but "2x = 5" stays an equation
        s = parts[1].strip()
    m = re.fullmatch(r"\(([A-Ea-e])\)", s)  # multiple choice "(B)" -> "B"
    if m:
        return m.group(1).upper()
    if re.fullmatch(r"-?\d{1,3}(?:(?:,\d{3})+|(?: \d{3})+)(?:\.\d+)?", s):  # 1,000 and 1 000 -> 1000 (not 1,2 or 32, 349)
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"(?<!\d) | (?!\d)", "", re.sub(r"\s+", " ", s))  # spaces go, except inside "1 1/2"
    s = re.sub(r"^(-?\d+)\.0+$", r"\1", s)                # 12.00 -> 12
    return re.sub(r"^(-?)\.(\d)", r"\g<1>0.\2", s)        # .5 -> 0.5

def _to_number(s):
    """Exact value of a normalised plain number (int, decimal, a/b, \\frac{a}{b}, mixed 1 1/2 or 3\\frac{1}{8}, a power
    2^{64} or 1.5\\times10^{3}) or None."""
    m = re.fullmatch(r"-?\d+(?:\.\d+)?", s)
    if m:
        return Fraction(s)
    m = re.fullmatch(r"(-?)(\d+)(?: (\d+)/(\d+)|\\frac\{(\d+)\}\{(\d+)\})", s)  # mixed number: a proper fraction
    if m:
        a, b = (int(m[3]), int(m[4])) if m[3] else (int(m[5]), int(m[6]))
        value = int(m[2]) + Fraction(a, b) if 0 < a < b else None
        return -value if value is not None and m[1] else value
    m = re.fullmatch(r"(-?)(\d+(?:\.\d+)?)((?:\\times|\\cdot)10)?\^(?:\{(-?\d{1,3})\}|(\d))", s)
    if m:  # 2^{64}, 1.5\times10^{3}: exact, whatever the size (a float makes 10^{400} inf)
        base, exp = Fraction(m[2]), int(m[4] or m[5])
        if not m[3] and base == 0 and exp <= 0:  # 0^0, 0^{-1}
            return None
        value = base * Fraction(10) ** exp if m[3] else base ** exp
        return -value if m[1] else value
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
# flat train.py script in the child). JSON lines in; "1", "0" or "t" (timed out) lines out.
_WORKER_SRC = r"""
import json, logging, os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
out = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(2, 1)  # stray prints must not corrupt the protocol
logging.disable(logging.CRITICAL)  # math_verify warns that its own timeouts are off
import re
try:
    from math_verify import parse, verify
except ImportError:  # the parent says so in one line
    sys.exit(1)
def letters(s):  # the variables and constants of an answer, not the names of its commands
    return set(re.findall(r"[a-zA-Z]", re.sub(r"\\[a-zA-Z]+", " ", s)))
def parse_all(s):  # None when math_verify read only part of s ("1 - \\frac{1}{e}" as 1, "\\sin^2 t" as sin^2)
    r = parse("$" + s + "$", parsing_timeout=None)
    return r if len(r) == 2 and letters(s) <= letters(r[1]) else None
import random
from sympy import Eq, Expr, FiniteSet, Float, I, Integral, Limit, Product, Sum, Tuple, oo
def numeric_eq(a, b):
    # simplify(a - b) can take seconds on a sum of products; values at 3 fixed random points decide in
    # milliseconds (positive points: no branch cuts). Equations match when lhs - rhs are proportional.
    # None (undecided, math_verify decides) for sets, matrices, inequalities, floats without variables.
    ratio = isinstance(a, Eq) and isinstance(b, Eq)
    if ratio:
        a, b = a.lhs - a.rhs, b.lhs - b.rhs
    if not (isinstance(a, Expr) and isinstance(b, Expr)) or a.has(Sum, Product, Integral, Limit) or b.has(Sum, Product, Integral, Limit):
        return None  # (sums and integrals with symbolic bounds evaluate slowly)
    unit = {s: I for s in a.free_symbols | b.free_symbols if str(s) == "i"}  # i is the imaginary unit
    a, b = a.subs(unit), b.subs(unit)
    syms = sorted(a.free_symbols | b.free_symbols, key=str)
    if not syms and (ratio or a.atoms(Float) or b.atoms(Float)):
        return None  # plain numbers: math_verify's rounding rules
    if not syms and a.is_Rational and b.is_Rational:
        return a == b  # exact, whatever the size: 999! != 100!
    rng, vals = random.Random(0), []
    for _ in range(3):
        point = {s: rng.uniform(0.5, 1.5) for s in syms}
        va, vb = a.evalf(30, subs=point), b.evalf(30, subs=point)  # sympy numbers: 10^{400} does not overflow
        if not (va.is_number and vb.is_number):
            return None
        if not (va.is_finite and vb.is_finite):  # inf, nan, zoo: |inf - b| <= tol * inf holds for every b
            if va == vb and va in (oo, -oo) and not ratio:
                continue
            return False
        if ratio:  # equations: lhs - rhs in one fixed, nonzero ratio at every point
            if va == 0 or vb == 0:
                return False
            va, vb = va / vb, vals[0][0] if vals else va / vb
        vals.append((va, vb))
    return all(abs(va - vb) <= 1e-9 * max(abs(va), abs(vb), 0 if ratio else 1) for va, vb in vals)
def infinite_points(e):  # {-oo, oo}, which math_verify matches with the interval (-oo, oo) as if it were a pair
    return isinstance(e, (FiniteSet, Tuple)) and any(x.is_infinite for x in e.args)
def check(gold, pred):
    g, p = parse_all(gold), parse_all(pred)
    if g is None or p is None or infinite_points(g[0]) != infinite_points(p[0]):
        return False
    try:
        fast = numeric_eq(g[0], p[0])
    except Exception:
        fast = None
    return fast if fast is not None else verify(g, p, timeout_seconds=None)
for s in json.loads(sys.argv[1]):  # see PRIME
    parse_all(s)
check("x^2+2x+1", "(x+1)^2")  # load sympy's simplify too before reporting ready
out.write(b"ready\n")
class Alarm(BaseException):  # not an Exception: math_verify and sympy catch those and carry on
    pass
def alarm(signum, frame):
    raise Alarm
signal.signal(signal.SIGALRM, alarm)  # (this is the worker's main thread, where signals work)
for line in sys.stdin.buffer:
    try:
        gold, pred, limit = json.loads(line)
        signal.setitimer(signal.ITIMER_REAL, max(limit, 1e-3))
        reply = b"1\n" if check(gold, pred) else b"0\n"
    except Alarm:
        reply = b"t\n"
    except BaseException:  # anything sympy raises
        reply = b"0\n"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out.write(reply)
"""
# math_verify's ANTLR parser builds its lookahead tables lazily: the first \sum, matrix or inequality it meets
# costs up to ~1 s (the "slow sum of products"), later ones milliseconds. The worker parses these shapes at
# start-up, so that cost is paid before "ready", outside every call's time limit.
PRIME = [r"\frac{1}{2}", r"\sqrt{2}+\sqrt[3]{5}", r"(1, \frac{9}{2})", r"[0, \infty) \cup (-1, 2]", r"\{1, 2, 3\}",
         r"x^2 + 2xy - 3 = 0", r"y = -\frac{1}{2}x + \frac{3}{4}", r"0 < f(x) < 1", r"x \geq 5", r"x \neq 3",
         r"a_{37} = 19, a_3 = 2", r"11z^{7}(5+11z^{7})", r"2^6 \cdot 3^5 \cdot 5^4", r"1 \pm \sqrt{19}",
         r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{array}{cc} 1 & 2 \end{array}", r"|x - 2|",
         r"\sin(x)\cos^2 y + \tan\theta", r"\log_2 8 + \ln e", r"4210_{7}", r"f(x) = 2x + 3", r"3.5\pi i",
         r"x \in [0.5, \infty)", r"\frac{\sqrt{\sqrt{11}+\sqrt{194}}}{15+2\sqrt{33}}", r"12:00", r"\binom{5}{2}",
         r"5!", r"\overline{AB}", r"e^{i\pi}", r"F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}", r"\prod_{i=1}^{n} (1 + x_i)"]
_cond = threading.Condition()  # guards the four below; notified when a worker is freed, ready, failed or gone
_pool = []     # every live worker, starting or ready
_idle = []     # ready workers that no call is using
_error = None  # why the last start-up failed (math_verify missing), raised to the calls waiting for it
timeouts = 0   # comparisons scored 0 without a verdict (deadline passed in the queue or in sympy): log it

def _readline(proc, timeout):
    # select() rather than a blocking read, so the limit holds in any thread. Each reply is one small
    # write, which a pipe delivers whole; b"" means the worker died.
    if not select.select([proc.stdout], [], [], max(timeout, 0))[0]:
        return None
    return os.read(proc.stdout.fileno(), 64).strip() or None

def _stop(p):
    p.kill()
    p.wait()
    p.stdin.close()
    p.stdout.close()

def _await(p, timeout):
    """In a thread: p's next line ("ready", or a reply that came after its call's deadline) frees it for the
    next call; silence or death kills it, and a replacement starts (not after a failed start-up)."""
    global _error
    try:
        ok = _readline(p, timeout) is not None
    except (OSError, ValueError):  # stopped meanwhile by _kill_all
        ok = False
    with _cond:
        if ok and p in _pool:
            p.ready, _error = True, None
            _idle.append(p)
        elif p in _pool:
            _pool.remove(p)
            if not p.ready:
                _error = ("reward: the math_verify worker process failed to start; check that "
                          "`python -c 'import math_verify'` works (pip install math-verify)")
            _fill()
        _cond.notify_all()
    if not ok:
        _stop(p)

def _fill():  # (under _cond) start workers until there are WORKERS
    while not _error and len(_pool) < WORKERS:
        p = subprocess.Popen([sys.executable, "-c", _WORKER_SRC, json.dumps(PRIME)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, bufsize=0)
        p.ready = False
        _pool.append(p)
        threading.Thread(target=_await, args=(p, STARTUP_TIMEOUT_S), daemon=True).start()

def _wait(timeout):  # (under _cond) for news of a worker; an error once every start-up has failed
    if _error and not _pool:
        raise RuntimeError(_error)
    _cond.wait(timeout)

def _acquire(timeout):
    """(a ready worker, its deadline), or (None, None) when none was free within timeout. A start-up is not
    counted: while no worker is ready (the first call, or just after a kill of each), a call waits for one."""
    global _error
    with _cond:
        _error = _error if _pool else None  # nothing alive: a fresh start, whatever failed before
        deadline = None
        while not _idle:
            _fill()
            if any(p.ready for p in _pool):  # all busy: wait for one, within the call's limit
                deadline = deadline or time.monotonic() + timeout
                if deadline <= time.monotonic():
                    return None, None
                _wait(deadline - time.monotonic())
            else:
                _wait(STARTUP_TIMEOUT_S)
        return _idle.pop(), deadline or time.monotonic() + timeout

def _kill_all():
    with _cond:
        workers, _pool[:], _idle[:] = _pool[:], [], []
    for p in workers:
        _stop(p)

atexit.register(_kill_all)  # (a worker also exits by itself when our end of its stdin closes)

def warmup():
    """Start the math_verify workers now (seconds, all at once) rather than on the first symbolic comparison."""
    global _error
    with _cond:
        _error = _error if _pool else None
        _fill()
        while not (_pool and all(p.ready for p in _pool)):
            _wait(STARTUP_TIMEOUT_S)

def _verify(gold, pred, timeout):
    """math_verify's verdict within timeout seconds of the call, the queue included; False past it."""
    global timeouts
    p, deadline = _acquire(timeout)
    reply = None
    if p is not None:
        try:  # the worker gives up by itself at ALARM_FRACTION of the time left ("t") and stays warm
            p.stdin.write(json.dumps([gold, pred, ALARM_FRACTION * (deadline - time.monotonic())]).encode() + b"\n")
            reply = _readline(p, deadline - time.monotonic())
        except (OSError, ValueError):  # it died (or _kill_all stopped it)
            pass
        if reply is None:  # the call scores 0 now; the worker is freed (or killed) in the background
            threading.Thread(target=_await, args=(p, HUNG_S), daemon=True).start()
    with _cond:
        if reply is not None:
            _idle.append(p)
            _cond.notify_all()
        timeouts += reply in (None, b"t")
    return reply == b"1"

# -----------------------------------------------------------------------------
# public entry points

def is_equiv(pred, gold, timeout=TIMEOUT_S):
    """True if the answer strings pred and gold are mathematically equal (see the module docstring)."""
    pred, gold = str(pred), str(gold)
    if len(pred) > MAX_ANSWER_CHARS or not _clean(pred).strip("{} "):  # empty: math_verify reads {} as the empty set
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p and p == g:
        return True
    gold_num = _to_number(g)
    if gold_num is not None:  # numeric ground truth: exact numeric comparison only
        return _to_number(p) == gold_num
    pred, gold = _clean(pred), _clean(gold)
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
