"""Shared fixtures: a tiny randomly initialised Llama with a ChatML tokenizer, built locally (no downloads)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def tiny_records(n: int = 24):
    labels = ["reconsidering", "noticing", "reframing"]
    records = [{"text": " ".join(TEXTS[(i + j) % len(TEXTS)] for j in range(1 + i % 3)),
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


def run_script(script: str, *args, cwd=None, check=True, env=None, **kw):
    """Run one of the pipeline scripts as a user would; return the CompletedProcess."""
    env = dict(env or os.environ, PYTHONPATH=ROOT, TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
