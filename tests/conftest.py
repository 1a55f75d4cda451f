"""Shared fixtures: a tiny randomly initialised Llama with a ChatML tokenizer, built locally (no downloads)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

# The suite's xdist workers share the machine's cores: one thread each, in the worker and in the scripts it
# starts (they inherit this), so that OpenMP threads spinning for one process do not hold the cores the
# other needs (on the 2-core Zen 3 it took the suite from 19 min 8 s to 10 min 41 s). Tests of the
# threaded paths set their own thread counts.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after the thread count is set)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sae.launch import launcher  # noqa: E402

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TEXTS = [
    "I stopped and reconsidered the plan after my sister pointed out the budget was too tight.",
    "When the meeting went badly I tried to see it from my manager's point of view instead.",
    "I noticed my hands were shaking before the exam, so I took three slow breaths.",
    "Looking back, I realised the pattern: every time I skip sleep, I argue with my partner.",
    "What if I had taken the other job? I keep imagining how the year would have gone.",
    "I broke the big project into small steps and wrote the first one on a sticky note.",
]


def make_tiny_model(folder: str, n_layers: int = 4, hidden: int = 32, seed: int = 0) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# transformers' names of a Llama block's weights -> GGUF's (llama.cpp's convert_hf_to_gguf.py)
GGUF_BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def make_tiny_gguf(model_folder: str, path: str) -> str:
    """The tiny model of make_tiny_model written as a float32 GGUF file, as llama.cpp writes a Llama: its
    hyperparameters, its BPE tokenizer and chat template, and q/k rows permuted to llama.cpp's rotary layout
    (transformers undoes that when it loads the file)."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(model_folder), AutoTokenizer.from_pretrained(model_folder)
    cfg = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    special = {a["id"] for a in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([tokens[i] for i in range(len(tokens))])
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def rotary_layout(w_OI, heads):
        return w_OI.reshape(heads, 2, w_OI.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w_OI.shape)

    for name, tensor in model.state_dict().items():
        a = tensor.numpy().astype("float32")
        if name == "lm_head.weight":  # tied to the embedding
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            w.add_tensor({"model.embed_tokens.weight": "token_embd.weight"}.get(name, "output_norm.weight"), a)
            continue
        _, _, block, *part, _ = name.split(".")
        part = ".".join(part)
        if part in ("self_attn.q_proj", "self_attn.k_proj"):
            a = rotary_layout(a, cfg.num_attention_heads if part == "self_attn.q_proj" else cfg.num_key_value_heads)
        w.add_tensor(f"blk.{block}.{GGUF_BLOCK_NAMES[part]}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tiny_records(n: int = 24):
    labels = ["reconsidering", "noticing", "reframing"]
    records = [{"text": f"Day {i}. " + " ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)),
                "primary_cognitive_action": labels[i % 3]} for i in range(n)]
    records[-1] = {"messages": [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": TEXTS[0]},
                                {"role": "assistant", "content": TEXTS[1]}],
                   "primary_cognitive_action": "noticing"}
    return records


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_jsonl(tmp_path / "tiny.jsonl", tiny_records())


def run_script(script: str, *args, cwd=None, check=True, env=None, nproc=1, **kw):
    """Run one of the pipeline scripts as a user would (on `nproc` processes through torchrun when above 1);
    return the CompletedProcess."""
    env = dict(env or os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    proc = subprocess.run([*launcher(sys.executable, nproc), os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def require_c_compiler():
    """Skip a test of the C training step where there is no C compiler; in CI (CI=true) fail instead, so
    that the suite cannot go green without testing the default CPU path."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI has no C compiler ({cc}): the C training step, the default on CPUs, would go untested")
        pytest.skip(f"no C compiler ({cc}): the C step cannot be built here")


def kill_when(script: str, *args, ready, cwd=None, env=None, timeout=120.0, nproc=1):
    """Start a pipeline script (on `nproc` processes through torchrun when above 1), wait until ready() is
    true (checked every 10 ms; exceptions count as not yet), then kill -9 it and every process it started;
    fails if the script finished first."""
    env = dict(env or os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    proc = subprocess.Popen([*launcher(sys.executable, nproc), os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                break
        except Exception:  # a file half-written or not there yet
            pass
        time.sleep(0.01)
    finished = proc.poll() is not None
    import psutil  # accelerate's dependency
    family = psutil.Process(proc.pid).children(recursive=True) if not finished else []  # torchrun's workers too
    proc.send_signal(signal.SIGKILL)
    for child in family:
        child.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)
    assert not finished, f"{script} finished before it could be killed"


def make_activations(path, n_examples=40, d=16, seed=0, labels=True, nan_example=None, length=(5, 30)):
    """A synthetic activations file in the extraction format (no model needed): sparse features plus
    noise, a large first token per example, and chat-like token roles."""
    import numpy as np
    from sae.activations import StreamingNpzWriter
    rng = np.random.default_rng(seed)
    lengths = rng.integers(*length, size=n_examples)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    atoms = rng.normal(size=(4 * d, d)).astype(np.float32)
    codes = (rng.random((n, 4 * d)) < 0.05) * rng.random((n, 4 * d))
    acts = (codes @ atoms + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
    acts[offsets[:-1]] *= 50  # attention sink
    roles = np.full(n, 2, dtype=np.int8)
    roles[offsets[:-1]] = 0
    roles[offsets[:-1] + 1] = 0
    if nan_example is not None:
        acts[offsets[nan_example] + 1, 0] = np.nan
    w = StreamingNpzWriter(str(path), (n, d), np.float16)
    w.append(acts)
    meta = {"model": "synthetic", "layer": 1, "hook": "blocks.1.hook_resid_post", "hidden_size": d,
            "n_examples": n_examples, "n_tokens": n, "dataset_path": "synthetic.jsonl", "dataset_sha256": "0" * 64,
            "max_length": 64}
    w.finish(offsets, rng.integers(0, 100, n), roles, np.arange(n_examples), meta,
             np.array(["a", "b", "c", "d"])[np.arange(n_examples) % 4] if labels else None)
    return str(path)
