"""
Config overrides for train.py and eval.py: `python train.py [configs/x.py ...] [--key=value ...]`.

A config file is plain Python assignments (`k = 16`, `lr = 1e-6`); `--key=value` is parsed with ast.literal_eval,
falling back to the raw string for str fields. Unknown keys and wrong types are errors that name the closest valid key.
"""
import ast
import difflib
from dataclasses import fields

# names other frameworks (TRL, verl, HF) use, so a misspelled or foreign key still points at ours
ALIASES = {"learning_rate": "lr", "num_generations": "k", "group_size": "k", "rollout_n": "k", "max_steps": "num_steps",
           "max_completion_length": "max_new_tokens", "train_batch_size": "prompts_per_step",
           "ppo_mini_batch_size": "prompts_per_update", "epsilon": "clip_low", "epsilon_high": "clip_high"}


def _coerce(name, value, typ, where):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # `lr = 1` is fine for a float field
    if typ is str and not isinstance(value, str):
        value = str(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {name} must be {typ.__name__}, got {value!r}")
    return value


def _check_key(cfg, name, where):
    names = [f.name for f in fields(cfg)]
    if name not in names:
        close = difflib.get_close_matches(name, names + [a for a in ALIASES if ALIASES[a] in names], n=1)
        hint = f"; did you mean {ALIASES.get(close[0], close[0])!r}?" if close else f"; valid keys: {', '.join(names)}"
        raise ValueError(f"{where}: unknown config key {name!r}{hint}")
    return {f.name: f.type for f in fields(cfg)}[name]


def parse_config(cfg, argv):
    """Apply config files and --key=value overrides from argv to the dataclass instance cfg, in order. Returns cfg."""
    for arg in argv:
        if arg in ("-h", "--help"):  # the dataclass is the documentation: list every key with its default
            print("options (--key=value, or config files of key = value lines):")
            for f in fields(cfg):
                print(f"  --{f.name}={getattr(cfg, f.name)!r}")
            raise SystemExit(0)
        if arg.startswith("--"):
            name, eq, raw = arg[2:].partition("=")
            name = name.replace("-", "_")
            typ = _check_key(cfg, name, arg)
            typ = typ if isinstance(typ, type) else eval(typ)  # annotations may be strings  # noqa: S307 (our own code)
            if not eq:
                if typ is not bool:
                    raise ValueError(f"{arg}: expected --{name}=VALUE")
                raw = "True"  # --resume alone means --resume=True
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                if typ is not str:
                    raise ValueError(f"{arg}: cannot parse {raw!r} as {typ.__name__}") from None
                value = raw
            setattr(cfg, name, _coerce(name, value, typ, arg))
        else:
            try:
                with open(arg) as f:
                    src = f.read()
            except OSError as e:
                raise FileNotFoundError(f"config file {arg!r}: {e.strerror}") from None
            scope = {}
            try:
                exec(compile(src, arg, "exec"), {}, scope)  # a config file is code the user wrote, like nanoGPT's
            except Exception as e:
                raise ValueError(f"config file {arg}: {type(e).__name__}: {e}") from None
            for name, value in scope.items():
                if name.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                typ = _check_key(cfg, name, arg)
                typ = typ if isinstance(typ, type) else eval(typ)  # noqa: S307
                setattr(cfg, name, _coerce(name, value, typ, arg))
    return cfg
