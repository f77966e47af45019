"""
The READMEs stay true. Every relative link (and #anchor) in README.md and results/README.md resolves to a file in
the repo; every `python ...` / `torchrun ...` command in README.md parses for its script, without doing the work:
train.py with --dry_run (the memory plan, no weights loaded), experiments.py with --dry_run (the grid, nothing run),
eval.py, bench.py, covariance.py and the rest with --help; the commands in results/README.md parse in-process; and
each results/*/RESULTS.md's "Produced by" command reproduces the train.py arguments stored in every run it holds.
~30 s on 2 busy cores (the README's commands run side by side, a few seconds of CPU each).
Run: python -m pytest -q tests/test_readme.py
"""
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "results/README.md")
# scripts the READMEs may name; a missing one fails
SCRIPTS = {"train.py", "eval.py", "bench.py", "experiments.py", "covariance.py", "gpucheck.py", "dev/bench_sync.py"}
# runs whose stored train.py args differ from their folder's command, and why (results/README.md section 5)
KNOWN = {("ablations/control", "grpo16_s2.json"): ("--threads=1", "--threads=2")}  # run at 2 threads


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def slug(heading):
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)  # links inside code blocks are not links
    return [(path, t) for t in re.findall(r"\]\(([^)\s]+)\)", text)]


def commands(path, inline=True):
    """(path, argv) for every python/torchrun command: fenced code lines (continuations joined, comments and
    `&&` chains split) and, if inline, `python ...` code spans."""
    text, out = read(path), []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if part.strip().startswith(("python ", "torchrun ")):  # output blocks are not shell
                    out.append(shlex.split(part, comments=True))
    if inline:
        out += [shlex.split(c) for c in re.findall(r"`((?:python|torchrun) [^`]+)`", text)]
    seen, uniq = set(), []
    for argv in out:
        if tuple(argv) not in seen:
            seen.add(tuple(argv))
            uniq.append((path, argv))
    return uniq


def script_of(argv):
    """argv -> (script or '-m module', its args): torchrun's own options are dropped, the script's kept."""
    rest = argv[1:]
    if argv[0] == "torchrun":
        while rest and rest[0].startswith("--"):
            rest = rest[1:]
    if rest[:1] == ["-m"]:
        return "-m " + rest[1], rest[2:]
    return rest[0], rest[1:]


# -----------------------------------------------------------------------------
# links

@pytest.mark.parametrize("doc,target", [x for d in DOCS for x in links(d)], ids=lambda x: str(x)[:60])
def test_link_resolves(doc, target):
    if re.match(r"[a-z]+:", target):
        return  # https:, mailto:: not checked here (no network in tests)
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else os.path.join(ROOT, doc)
    assert full.startswith(ROOT + os.sep) and os.path.exists(full), f"{doc}: link {target!r} -> no {full}"
    if anchor:
        heads = [slug(h) for h in re.findall(r"^#+ (.+)$", read(os.path.relpath(full, ROOT)), flags=re.M)]
        assert anchor in heads, f"{doc}: link {target!r}: no heading #{anchor} in {path or doc} (has {heads})"


def test_readme_is_short_and_links_the_study():
    text = read("README.md")
    assert len(text.splitlines()) <= 260, "README.md is the front page; the study lives in results/README.md"
    assert "](results/README.md" in text and "](dev/perf.md)" in text and "](loss.py)" in text


def test_nothing_in_results_points_outside_the_repo():
    bad = []
    for path in glob.glob(os.path.join(ROOT, "results", "**", "*"), recursive=True):
        if path.endswith((".md", ".json", ".txt")):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if re.search(r"(^|[\s'\"(=])(/work|/tmp|/home|/root|/Users|~/)", line):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()[:100]}")
    assert not bad, "paths outside the repo:\n" + "\n".join(bad)


# -----------------------------------------------------------------------------
# README.md's commands, each run as a subprocess that parses its arguments and stops before the work

README_CMDS = commands("README.md")


def check_argv(argv):
    """The subprocess that checks argv, or a reason it cannot be checked here (str)."""
    script, args = script_of(argv)
    if script.startswith("-m "):
        return None
    if script not in SCRIPTS:
        return f"{script} is not in tests/test_readme.py's SCRIPTS: add it, with how to check its arguments"
    if not os.path.exists(os.path.join(ROOT, script)):
        return f"{script} does not exist"
    stop = "--help"
    if script == "train.py" or (script == "experiments.py" and not {"--difficulty", "--report_only"} & set(args)):
        stop = "--dry_run"  # the plan / the grid, printed before any weights load
    return [sys.executable, script, *args] + ([] if stop in args else [stop])


@pytest.fixture(scope="module")
def readme_runs():
    """Every README command's check, side by side (each is mostly interpreter and torch start-up)."""
    todo = {tuple(argv): check_argv(argv) for _, argv in README_CMDS}
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = lambda cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    jobs = {k: v for k, v in todo.items() if isinstance(v, list)}
    with ThreadPoolExecutor(4) as pool:
        done = dict(zip(jobs, pool.map(run, jobs.values())))
    return todo, done


def test_readme_has_the_main_commands():
    scripts = {script_of(argv)[0] for _, argv in README_CMDS}
    assert {"train.py", "eval.py", "-m pytest"} <= scripts, scripts


@pytest.mark.parametrize("argv", [a for _, a in README_CMDS], ids=lambda a: " ".join(a)[:70])
def test_readme_command_parses(argv, readme_runs):
    todo, done = readme_runs
    check, script = todo[tuple(argv)], script_of(argv)[0]
    if script.startswith("-m "):
        assert importlib.util.find_spec(script[3:]), f"{' '.join(argv)}: no module {script[3:]}"
        for a in script_of(argv)[1]:
            assert a.startswith("-") or os.path.exists(os.path.join(ROOT, a)), f"{' '.join(argv)}: no {a}"
        return
    if isinstance(check, str):
        pytest.fail(f"{' '.join(argv)}: {check}")
    p = done[tuple(argv)]
    assert p.returncode == 0, f"{' '.join(check[1:])} -> exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"


# -----------------------------------------------------------------------------
# results/: the commands parse, and each RESULTS.md's command reproduces its runs

def parse_in_process(script, args):
    """Parse args as the script's __main__ does, without running it."""
    sys.path.insert(0, ROOT)
    from config import parse_config
    if script == "eval.py":
        import eval as ev
        return ev.parse_args(args)
    if script == "covariance.py":
        import covariance
        return parse_config(covariance.Config(), args)
    if script == "experiments.py":
        import experiments
        c = parse_config(experiments.Config(), args)
        assert set(c.methods.split(",")) <= set(experiments.METHODS), c.methods
        return c
    if script == "train.py":  # train.py runs on import: its --help parses config files and keys, then exits 0
        p = subprocess.run([sys.executable, "train.py", *args, "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-1500:]
        return None
    raise AssertionError(f"no in-process parser for {script}: add one to tests/test_readme.py")


@pytest.mark.parametrize("argv", [a for _, a in commands("results/README.md")], ids=lambda a: " ".join(a)[:70])
def test_results_readme_command_parses(argv):
    script, args = script_of(argv)
    parse_in_process(script, args)


def produced_by(md):
    """The experiments.py commands of a RESULTS.md's "Produced by" block."""
    text = read(md)
    m = re.search(r"\*\*Produced by\*\*.*?```\n(.*?)```", text, flags=re.S)
    assert m, f"{md}: no 'Produced by' block naming the command that made it"
    assert re.search(r"\*\*Commit:\*\* .*\b[0-9a-f]{7}\b", text), f"{md}: no commit named"
    return [script_of(shlex.split(line, comments=True))[1] for line in m.group(1).splitlines()
            if line.startswith("python experiments.py")]


RESULTS_MDS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "results", "*", "*", "RESULTS.md")))


@pytest.mark.parametrize("md", RESULTS_MDS)
def test_results_md_command_reproduces_its_runs(md):
    sys.path.insert(0, ROOT)
    import experiments
    cmds = produced_by(md)
    assert cmds, f"{md}: no python experiments.py command"
    folder = os.path.dirname(md)
    name = os.path.relpath(folder, "results")
    runs = sorted(glob.glob(os.path.join(ROOT, folder, "*_s*.json")))
    assert runs, f"{md}: no runs"
    for run in runs:
        stored = json.load(open(run))
        want = list(stored["train_args"])
        if (name, os.path.basename(run)) in KNOWN:
            ours, theirs = KNOWN[name, os.path.basename(run)]
            want = [ours if a == theirs else a for a in want]
        ok = []
        for args in cmds:
            c = parse_in_process("experiments.py", args)
            if stored["method"] in c.methods.split(","):
                ok.append(experiments.train_args(stored["method"], stored["seed"], c) == want)
        assert any(ok), f"{md}: no command reproduces {os.path.basename(run)}'s train_args {want}"
