"""Extraction speed and memory: extract_activations.py against the plain loop, side by side in one run.

The plain loop is what a first version does: one example at a time, a full forward pass with
output_hidden_states=True (all blocks and the LM head), float32. Both see the same 200 sample examples
with the same tokens; ours is timed by its own pass (the script's "Throughput" line, model loading
excluded on both sides). The plain loop runs half before ours and half after, so drift in the machine's
speed (shared cores) falls on both sides alike.

    python bench/bench_extract.py                 # speed, SmolLM2-135M-Instruct on CPU
    python bench/bench_extract.py --memory        # also peak RSS at 900 and 4x900 examples (/usr/bin/time -v)
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sae import chat, lm, runtime  # noqa: E402
from sae.files import activations_path, extract_metrics_path  # noqa: E402
from sae.activations import open_activations  # noqa: E402

N_EXAMPLES, LAYER = 200, 12
SAMPLE = os.path.join(ROOT, "data", "cognitive_actions_sample.jsonl")


def subset(path, n, repeat=1):
    lines = open(SAMPLE, encoding="utf-8").read().splitlines()[:n]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines * repeat) + "\n")
    return path


def run_ours(dataset, out, timed=False):
    cmd = [sys.executable, os.path.join(ROOT, "extract_activations.py"), f"--dataset_path={dataset}",
           f"--output_dir={out}", f"--layer_idx={LAYER}"]
    if timed:
        cmd = ["/usr/bin/time", "-v"] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        sys.exit(f"extract_activations.py failed:\n{proc.stderr[-3000:]}")
    return proc


def plain_loop(model, tok, records):
    """(seconds, [(token ids, layer output float32)] per record) of the plain loop. Tokenization is done
    before the clock starts, as extract_activations.py's own throughput counts only its forward passes."""
    examples = [chat.tokenize_example(tok, [{"role": "user", "content": r["text"]}], True, 512)[0] for r in records]
    out = []
    t0 = time.time()
    with torch.no_grad():
        for ids in examples:
            h = model(torch.from_numpy(ids.astype(np.int64))[None], output_hidden_states=True).hidden_states
            out.append((ids, h[LAYER + 1][0].numpy()))
    return time.time() - t0, out


def main():
    tmp = tempfile.mkdtemp(prefix="bench_extract_")
    dataset = subset(os.path.join(tmp, "sub.jsonl"), N_EXAMPLES)
    records = [json.loads(line) for line in open(dataset, encoding="utf-8")]
    location = lm.resolve_model(lm.DEFAULT_MODEL)
    tok = lm.load_tokenizer(location)
    model = lm.load_model(location, torch.device("cpu"), torch.float32)
    runtime.keep_freed_memory()  # the allocator setting extraction uses on a CPU, for the plain loop too

    # the plain loop runs half before and half after ours, so a machine whose speed drifts (shared
    # cores) weighs on both sides alike
    seconds_1, plain_1 = plain_loop(model, tok, records[:N_EXAMPLES // 2])
    run_ours(dataset, os.path.join(tmp, "ours"))
    with open(extract_metrics_path(os.path.join(tmp, "ours"))) as f:
        ours_rate = json.load(f)["tokens_per_s"]
    seconds_2, plain_2 = plain_loop(model, tok, records[N_EXAMPLES // 2:])

    ours = open_activations(activations_path(os.path.join(tmp, "ours"), LAYER))
    n_tok, max_abs, max_rel = 0, 0.0, 0.0
    for i, (ids, plain) in enumerate(plain_1 + plain_2):
        np.testing.assert_array_equal(ours.token_ids[ours.offsets[i]:ours.offsets[i + 1]], ids)
        diff = np.asarray(ours.example(i), dtype=np.float32) - plain
        max_abs = max(max_abs, float(np.abs(diff).max()))
        max_rel = max(max_rel, float((np.linalg.norm(diff, axis=1) / np.linalg.norm(plain, axis=1)).max()))
        n_tok += len(ids)
    plain_rate = n_tok / (seconds_1 + seconds_2)
    print(f"examples: {N_EXAMPLES}, tokens: {n_tok}, layer {LAYER}, torch threads: {torch.get_num_threads()}")
    print(f"plain loop (one at a time, full forward, output_hidden_states, float32): {plain_rate:.0f} tokens/s")
    print(f"extract_activations.py (length-batched, stops after block {LAYER}, float16 store): {ours_rate:.0f} tokens/s")
    print(f"speed ratio: {ours_rate / plain_rate:.2f}x")
    print(f"max abs difference: {max_abs:.4g}; max relative difference per token (L2): {max_rel:.2e} "
          f"(float16 storage rounding)")
    if max_rel > 1e-2:
        sys.exit(f"the stored activations differ from the plain forward pass by {max_rel:.2e} (relative): "
                 f"more than float16 rounding")

    if "--memory" in sys.argv:
        rss = {}
        for n, repeat in ((900, 1), (900, 4)):
            data = subset(os.path.join(tmp, f"mem{repeat}.jsonl"), n, repeat)
            out = run_ours(data, os.path.join(tmp, f"mem{repeat}"), timed=True)
            rss[n * repeat] = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
            print(f"peak RSS at {n * repeat} examples: {rss[n * repeat] / 1024:.0f} MiB")
        print(f"peak memory ratio 3600/900: {rss[3600] / rss[900]:.3f}")


if __name__ == "__main__":
    main()
