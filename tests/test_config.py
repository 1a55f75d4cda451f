import pytest

from sae.config import ConfigError, parse_overrides

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
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["layer_idx=3"], DEFAULTS)
