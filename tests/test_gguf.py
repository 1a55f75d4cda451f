"""A GGUF model (the embedded default's format) is converted once into a transformers folder in the per-user
cache and loaded from there: the same tokens and the same weights to the bit, never from a folder others can
write, and never a half-written folder."""
import errno
import os

import pytest
import torch

from conftest import TEXTS, make_tiny_gguf
from sae import lm


@pytest.fixture
def gguf_location(tiny_model, tmp_path):
    return lm.resolve_model(make_tiny_gguf(tiny_model, str(tmp_path / "tiny.gguf")))


def chat_ids(tokenizer):
    return tokenizer.apply_chat_template([{"role": "user", "content": TEXTS[0]}], tokenize=True,
                                         return_dict=True)["input_ids"]


def test_a_gguf_loads_from_its_converted_folder_with_the_same_tokens_and_weights(gguf_location, tmp_path,
                                                                                 monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = lm.load_config(gguf_location)
    folder = lm.gguf_cache_path(gguf_location, str(tmp_path / "cache" / "sae-pipeline" / "models"))
    assert os.path.isfile(os.path.join(folder, "config.json")) and not config.to_dict().get("quantization_config")
    assert lm.loadable(gguf_location) == lm.ModelLocation(folder, None, gguf_location.source)

    model = lm.load_model(gguf_location, torch.device("cpu"), torch.float32)
    tokenizer = lm.load_tokenizer(gguf_location)
    direct = dict(pretrained_model_name_or_path=gguf_location.path, gguf_file=gguf_location.gguf_file)
    ref_model = AutoModelForCausalLM.from_pretrained(**direct, dtype=torch.float32).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(**direct)
    ids = chat_ids(tokenizer)
    assert ids == chat_ids(ref_tokenizer) and tokenizer.pad_token_id == ref_tokenizer.pad_token_id
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, ref_model(torch.tensor([ids])).logits)

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again")
    monkeypatch.setattr(lm, "_convert_gguf", no_conversion)
    lm.load_tokenizer(gguf_location)  # from the folder
    gguf = os.path.join(gguf_location.path, gguf_location.gguf_file)
    os.utime(gguf, ns=(os.stat(gguf).st_atime_ns, os.stat(gguf).st_mtime_ns + 10 ** 9))
    assert lm.gguf_cache_path(gguf_location, os.path.dirname(folder)) != folder  # a changed file: converted anew


def test_a_cache_folder_others_can_write_is_not_used(gguf_location, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    assert lm.loadable(gguf_location, str(shared)) == gguf_location and os.listdir(shared) == []


def test_a_cache_that_cannot_be_written_keeps_nothing_and_the_gguf_is_loaded(gguf_location, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase
    folder = tmp_path / "models"

    def disk_full(self, save_directory, **kwargs):  # the weights are written, then the disk fills
        assert os.listdir(save_directory)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    assert lm.loadable(gguf_location, str(folder)) == gguf_location
    assert os.listdir(folder) == []

    def no_conversion(*args):
        raise AssertionError("the conversion was tried again")
    monkeypatch.setattr(lm, "_convert_gguf", no_conversion)  # the next load in this process reads the GGUF at once
    assert lm.loadable(gguf_location, str(folder)) == gguf_location
