"""Command-line overrides for the scripts' module-level UPPER_CASE constants.

A script keeps its knobs as plain constants in one block and ends the block with

    config = configure(globals())

after which `--layer_idx=18`, `--MODEL_NAME=path/to/model` or `--chat_template=False` on the command
line replace the constants (names in any case). Values are parsed with `ast.literal_eval`; what does
not parse stays a string, so `--dataset_path=data/x.jsonl` needs no quotes. Each value must have the
type of the default (an int is accepted where a float is expected; a default of None accepts anything).
A knob whose default has one type but accepts others lists them in `also`, e.g. LAYER_IDX: (list,).
(nanoGPT's configurator.py without `exec`, with unknown names and bad types reported as one sentence.)
"""
import ast
import json
import re
import sys
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """The URL without the user name and password it may carry (user:password@host)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def redacted(config: dict) -> dict:
    """The config as it may be printed or stored in a report: credentials in URL settings redacted."""
    return {k: redact(v) if isinstance(v, str) and "://" in v else v for k, v in config.items()}


class ConfigError(Exception):
    """A bad input from the user: ends the script with one sentence and exit code 2."""


def fail(message: str, code: int = 2):
    """Print one sentence on stderr and exit with a non-zero code (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


_KNOB_LINE = re.compile(r"^([A-Z][A-Z0-9_]*) = ")


def script_knobs(path: str) -> dict:
    """The settings of a script and their defaults, read from its source without running it: the
    UPPER_CASE constants assigned a literal at top level before its `configure(...)` call."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    knobs = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "configure":
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and _KNOB_LINE.match(node.targets[0].id + " = "):
            knobs[node.targets[0].id] = ast.literal_eval(node.value)
    return knobs


def _type_ok(value, default, also) -> bool:
    if default is None or any(isinstance(value, t) and not (t is int and isinstance(value, bool))
                              for t in also):
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def parse_value(raw: str, default):
    """A command-line value: a Python literal, else the raw string (also for str settings given a number)."""
    try:
        value = ast.literal_eval(raw)
    except (SyntaxError, ValueError):
        return raw  # an unquoted string such as data/x.jsonl or cuda
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return raw  # e.g. --run_name=2024 stays the string "2024"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_overrides(args: list[str], defaults: dict, also: dict | None = None) -> dict:
    """Return {NAME: value} for `--name=value` arguments; raise ConfigError on anything wrong."""
    also = also or {}
    by_lower = {k.lower(): k for k in defaults}
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --name=value "
                              f"(valid names: {', '.join(k.lower() for k in defaults)})")
        key, raw = arg[2:].split("=", 1)
        name = by_lower.get(key.lower().replace("-", "_"))
        if name is None:
            raise ConfigError(f"unknown setting --{key}; valid settings are: "
                              f"{', '.join(k.lower() for k in defaults)}")
        value = parse_value(raw, defaults[name])
        if not _type_ok(value, defaults[name], also.get(name, ())):
            allowed = [type(defaults[name]).__name__] + [t.__name__ for t in also.get(name, ())]
            raise ConfigError(f"--{key}={raw} has type {type(value).__name__}, but {name} takes "
                              f"{' or '.join(allowed)} (default {defaults[name]!r})")
        out[name] = value
    return out


def describe(path: str) -> str:
    """The script's config block as help text: each constant with its trailing comment."""
    lines, knobs = [], script_knobs(path)
    for line in open(path, encoding="utf-8"):
        if re.match(r"^# ----", line) and not re.match(r"^# -{10}", line):
            lines.append(line.rstrip())
        elif (m := _KNOB_LINE.match(line)) and m.group(1) in knobs:
            lines.append("  --" + line.split(" = ")[0].lower() + " = " + line.split(" = ", 1)[1].rstrip())
    return "\n".join(lines)


def configure(namespace: dict, argv: list[str] | None = None, also: dict | None = None) -> dict:
    """Apply `--name=value` overrides to the caller's globals, print and return the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(namespace.get("__doc__") or "")
        print("Settings (override with --name=value):")
        print(describe(namespace["__file__"]))
        sys.exit(0)
    defaults = {k: namespace[k] for k in script_knobs(namespace["__file__"])}
    try:
        overrides = parse_overrides(argv, defaults, also)
    except ConfigError as e:
        fail(str(e))
    namespace.update(overrides)
    config = {k: namespace[k] for k in defaults}
    print("config: " + json.dumps(redacted(config), default=str), flush=True)
    return config
