"""config.py: train.py's checks across keys (config.check_train) and --help, which lists every key with its value and
its comment, grouped by the dataclass's `# section` lines. Run: python -m pytest -q tests/test_config.py"""
import ast
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_config():
    """train.py's Config class, built from its source (train.py is a script: importing it would train)."""
    tree = ast.parse(open(os.path.join(ROOT, "train.py")).read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    scope = {"dataclass": dataclass}
    exec(compile(ast.Module([cls], type_ignores=[]), "train.py", "exec"), scope)
    return scope["Config"]


@pytest.mark.parametrize("args,expect", [
    # runs that can never learn (issue 25: they exited 0 after steps without a single update)
    (["--k=1"], "--k=1: one rollout per prompt has no group"),
    (["--prompts_per_step=0"], "--prompts_per_step=0: must be > 0"),
    (["--temperature=0"], "greedy rollouts of one prompt are identical"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: must be > 0"),
    (["--lr=0"], "--lr=0.0: must be > 0"),
    (["--num_steps=0"], "--num_steps=0: must be > 0"),
    # values that crashed with a traceback or meant nothing
    (["--k=0"], "--k=0: must be > 0"),
    (["--prompts_per_update=0"], "--prompts_per_update=0: must be > 0"),  # was a ZeroDivisionError
    (["--lr=-1"], "--lr=-1.0: must be > 0"),
    (["--eval_every=-1"], "--eval_every=-1: must be >= 0"),
    (["--save_every=-2"], "--save_every=-2: must be >= 0"),
    (["--agg=mean"], "--agg='mean': expected one of"),
    (["--dtype=fp16"], "--dtype='fp16': expected one of"),
])
def test_check_train_refuses(args, expect):
    with pytest.raises(ValueError) as e:
        config.check_train(config.parse_config(train_config()(), args))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_check_train_passes_the_shipped_configs():
    """Every configs/*.py file and the defaults pass the checks (a check must not refuse a real run)."""
    Config = train_config()
    assert config.check_train(Config()).k == 2
    for f in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if f.endswith(".py"):
            config.check_train(config.parse_config(Config(), [os.path.join(ROOT, "configs", f)]))
    dpo_offline = config.parse_config(Config(), ["--algo=dpo_offline", "--k=1", "--temperature=0"])
    assert config.check_train(dpo_offline).k == 1  # offline DPO samples nothing: k and temperature are unused


def test_train_help_lists_keys_with_comments_by_section():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("usage: python train.py")
    k = next(line for line in lines if line.strip().startswith("--k="))
    assert k.split() == ["--k=2", "rollouts", "per", "prompt;", "k=2", "is", "2-GRPO"]
    # sections in the dataclass's order, each key under its own
    assert lines.index("algorithm:") < lines.index(k) < lines.index("batch sizes, in prompts (or pairs):")
    # a comment continued on the next source line is one help entry
    i = next(i for i, line in enumerate(lines) if line.strip().startswith("--old_logp="))
    assert "verl's compute_log_prob" in lines[i] + lines[i + 1]
    keys = {line.split("=")[0].strip() for line in lines if line.strip().startswith("--")}
    assert keys == {f"--{n.target.id}" for n in ast.parse(open(os.path.join(ROOT, "train.py")).read()).body
                    if isinstance(n, ast.ClassDef) and n.name == "Config" for n in n.body
                    if isinstance(n, ast.AnnAssign)}


def test_eval_help_lists_keys_with_comments(capsys):
    import eval as ev
    with pytest.raises(SystemExit) as e:
        ev.parse_args(["--n_samples=4", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--n_samples=4" in out and "samples per problem: the n in mean@n" in out and "--top_p=1.0" in out
