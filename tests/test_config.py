import glob
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from sae.config import ConfigError, parse_overrides, script_knobs

DEFAULTS = {"LAYER_IDX": 12, "LR": 1e-3, "DATASET_PATH": "data/x.jsonl", "CHAT_TEMPLATE": True,
            "CACHE_DIR": None, "RUN_NAME": "run", "PREFIXES": [64, 256]}


def test_types_case_and_unquoted_strings():
    out = parse_overrides(["--layer_idx=18", "--LR=1", "--dataset_path=data/y.jsonl", "--Chat_Template=False",
                           "--cache_dir=/tmp/hf", "--run_name=2024", "--prefixes=[8, 32]"], DEFAULTS)
    assert out == {"LAYER_IDX": 18, "LR": 1.0, "DATASET_PATH": "data/y.jsonl", "CHAT_TEMPLATE": False,
                   "CACHE_DIR": "/tmp/hf", "RUN_NAME": "2024", "PREFIXES": [8, 32]}
    assert isinstance(out["LR"], float)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown setting --layer.*valid settings are: layer_idx, lr"):
        parse_overrides(["--layer=3"], DEFAULTS)


@pytest.mark.parametrize("arg", ["--layer_idx=1.5", "--layer_idx=True", "--chat_template=1", "--lr=abc",
                                 "--layer_idx=[1, 2]"])
def test_wrong_type_rejected(arg):
    with pytest.raises(ConfigError, match="has type"):
        parse_overrides([arg], DEFAULTS)


def test_extra_types_and_bad_form():
    assert parse_overrides(["--layer_idx=[1, 2]"], DEFAULTS, {"LAYER_IDX": (list,)}) == {"LAYER_IDX": [1, 2]}
    with pytest.raises(ConfigError, match="neither --name=value, --name value nor a config file"):
        parse_overrides(["layer_idx=3"], DEFAULTS)


def test_spaced_values_and_boolean_words():
    out = parse_overrides(["--layer_idx", "18", "--chat_template=false", "--run_name", "x"], DEFAULTS)
    assert out == {"LAYER_IDX": 18, "CHAT_TEMPLATE": False, "RUN_NAME": "x"}
    for word, value in (("True", True), ("true", True), ("YES", True), ("no", False), ("False", False)):
        assert parse_overrides([f"--chat_template={word}"], DEFAULTS) == {"CHAT_TEMPLATE": value}
    with pytest.raises(ConfigError, match="has type str, but CHAT_TEMPLATE takes bool"):
        parse_overrides(["--chat_template=maybe"], DEFAULTS)
    with pytest.raises(ConfigError, match="--layer_idx has no value"):
        parse_overrides(["--layer_idx"], DEFAULTS)
    assert parse_overrides(["--run_name=true"], DEFAULTS) == {"RUN_NAME": "true"}, "words stay strings elsewhere"


def test_a_config_file_applies_in_order_and_names_its_bad_lines(tmp_path):
    cfg = tmp_path / "run.py"
    cfg.write_text('"""doc"""\nLAYER_IDX = 6\nRUN_NAME = "big"\nPREFIXES = [8, 32]\n')
    assert parse_overrides([str(cfg), "--layer_idx=7"], DEFAULTS) == {"LAYER_IDX": 7, "RUN_NAME": "big", "PREFIXES": [8, 32]}
    assert parse_overrides(["--layer_idx=7", str(cfg)], DEFAULTS)["LAYER_IDX"] == 6, "later settings win"
    for text, message in (("LAYER = 3\n", rf"unknown setting LAYER \(in {cfg} line 1\)"),
                          ("LAYER_IDX = 1.5\n", rf"{cfg} line 1 has type float"),
                          ("import os\n", rf"{cfg} line 1 is not a NAME = value line"),
                          ("LAYER_IDX = 3\nLR = 2 ** -10\n", rf"{cfg} line 2: the value of LR is not a literal"),
                          ("LAYER_IDX = (\n", rf"{cfg} line 1 is not valid Python")):
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_overrides([str(cfg)], DEFAULTS)
    with pytest.raises(ConfigError, match="cannot be read"):
        parse_overrides([str(tmp_path / "missing.py")], DEFAULTS)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_the_shipped_configs_name_only_real_settings(path):
    knobs = {}
    for script in ("extract_activations.py", "train_sae.py", "interpret_sae.py"):
        knobs.update(script_knobs(os.path.join(ROOT, script)))
    assert parse_overrides([path], knobs), "a config sets something"


@pytest.mark.parametrize("script", ["extract_activations.py", "train_sae.py", "interpret_sae.py"])
def test_help_answers_before_heavy_imports_and_stops_at_the_settings_block(script):
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, script), "--help"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and "Settings (override with" in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert not any(m.split(".")[0] in ("torch", "transformers", "numpy") for m in imported), "help loads nothing heavy"
    assert "settings check" not in proc.stdout, "help stops at the end of the settings block"
