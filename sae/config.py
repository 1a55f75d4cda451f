"""Command-line overrides for the scripts' module-level UPPER_CASE constants.

A script keeps its knobs as plain constants in one block and ends the block with

    config = configure(globals())

after which `--layer_idx=18` (or `--layer_idx 18`), `--MODEL_NAME=path/to/model` or
`--chat_template=false` on the command line replace the constants (names in any case; booleans as
True/False, true/false or yes/no). Values are parsed with `ast.literal_eval`; what does not parse stays a
string, so `--dataset_path=data/x.jsonl` needs no quotes. A `.py` file on the command line is a config
file of `NAME = value` lines (`python train_sae.py configs/llama8b.py --lr=1e-3`); everything is
applied in order, so later settings win. Each value must have the type of the default (an int is
accepted where a float is expected; a default of None accepts anything). A knob whose default has one
type but accepts others lists them in `also`, e.g. LAYER_IDX: (list,). (nanoGPT's configurator.py
without `exec`, with unknown names and bad types reported as one sentence.)
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


BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def parse_value(raw: str, default):
    """A command-line value: a Python literal, else the raw string (also for str settings given a number);
    for a bool setting also true/false and yes/no in any case."""
    if isinstance(default, bool) and raw.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[raw.strip().lower()]
    try:
        value = ast.literal_eval(raw)
    except (SyntaxError, ValueError):
        return raw  # an unquoted string such as data/x.jsonl or cuda
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return raw  # e.g. --run_name=2024 stays the string "2024"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_file(path: str) -> list[tuple[str, str, str]]:
    """(name, value as a literal, where) for each `NAME = value` line of a config file, in order. The file is
    parsed, never run: each line must assign a literal (a number, string, bool, None or list)."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); check the path") from None
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno} is not valid Python ({e.msg})") from None
    out = []
    for node in tree.body:
        where = f"{path} line {node.lineno}"
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{where} is not a NAME = value line; a config file holds only such lines")
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise ConfigError(f"{where}: the value of {node.targets[0].id} is not a literal (a number, string, "
                              f"bool, None or list); write the value itself") from None
        out.append((node.targets[0].id, repr(value), where))
    return out


def command_line(argv: list[str], flags: tuple[str, ...] = ()) -> list[tuple[str, str | None, str]]:
    """The command line as (name as given, raw value, where it came from), in order: `--name=value`,
    `--name value`, a config file's lines in its place, and the named `flags` (no value: raw None)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg.endswith(".py") and not arg.startswith("-"):
            out += config_file(arg)
        elif not arg.startswith("--") or arg == "--":
            raise ConfigError(f"argument {arg!r} is neither --name=value, --name value nor a config file (.py)")
        elif "=" in arg:
            key, raw = arg[2:].split("=", 1)
            out.append((key, raw, f"--{key}={raw}"))
        elif arg[2:].lower() in flags:
            out.append((arg[2:], None, arg))
        elif i < len(argv) and not argv[i].startswith("--"):
            out.append((arg[2:], argv[i], f"{arg} {argv[i]}"))
            i += 1
        else:
            raise ConfigError(f"{arg} has no value; write {arg}=value or {arg} value")
    return out


def parse_overrides(args: list[str], defaults: dict, also: dict | None = None) -> dict:
    """Return {NAME: value} for the command line (command_line's forms, later ones winning); raise
    ConfigError on anything wrong."""
    also = also or {}
    by_lower = {k.lower(): k for k in defaults}
    out = {}
    for key, raw, where in command_line(args):
        name = by_lower.get(key.lower().replace("-", "_"))
        if name is None:
            raise ConfigError(f"unknown setting {key if ' line ' in where else '--' + key} (in {where}); valid "
                              f"settings are: {', '.join(k.lower() for k in defaults)}")
        value = parse_value(raw, defaults[name])
        if not _type_ok(value, defaults[name], also.get(name, ())):
            allowed = [type(defaults[name]).__name__] + [t.__name__ for t in also.get(name, ())]
            raise ConfigError(f"{where} has type {type(value).__name__}, but {name} takes "
                              f"{' or '.join(allowed)} (default {defaults[name]!r})")
        out[name] = value
    return out


def describe(path: str) -> str:
    """The script's config block as help text: its section headers and each constant with its comment."""
    lines, knobs = [], script_knobs(path)
    for line in open(path, encoding="utf-8"):
        if line.startswith("config = configure("):
            break
        if re.match(r"^# ----", line) and not re.match(r"^# -{10}", line):
            lines.append(line.rstrip())
        elif (m := _KNOB_LINE.match(line)) and m.group(1) in knobs:
            lines.append("  --" + line.split(" = ")[0].lower() + " = " + line.split(" = ", 1)[1].rstrip())
    return "\n".join(lines)


def answer_help(doc: str | None, path: str, argv: list[str] | None = None):
    """With -h or --help on the command line: print the script's docstring and settings, and exit. Scripts
    call it before their heavy imports (torch, transformers), so that help comes at once."""
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(doc or "")
        print("Settings (override with --name=value or --name value, or a config file of NAME = value lines):")
        print(describe(path))
        sys.exit(0)


def configure(namespace: dict, argv: list[str] | None = None, also: dict | None = None) -> dict:
    """Apply the command line's overrides to the caller's globals, print and return the resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    answer_help(namespace.get("__doc__"), namespace["__file__"], argv)
    defaults = {k: namespace[k] for k in script_knobs(namespace["__file__"])}
    try:
        overrides = parse_overrides(argv, defaults, also)
    except ConfigError as e:
        fail(str(e))
    namespace.update(overrides)
    config = {k: namespace[k] for k in defaults}
    print("config: " + json.dumps(redacted(config), default=str), flush=True)
    return config
