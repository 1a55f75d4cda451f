"""Extract residual-stream activations of an instruct model, one example at a time (FAST).

FAST (Finetuning-aligned Sequential Training, arXiv 2506.07691): every example is formatted with the
model's chat template exactly as in fine-tuning and run on its own, never concatenated with others into
fixed-size blocks. Examples of similar length share a padded batch for speed; padding is masked out and
the results equal one-at-a-time processing. The output of each requested decoder block is streamed to
`activations/activations_layer{L}.npz` (see sae/activations.py for the format).

    python extract_activations.py                                  # SmolLM2-135M-Instruct, sample data, CPU
    python extract_activations.py --layer_idx=[6,12,18] --max_length=256
    python extract_activations.py --model_name=meta-llama/Llama-3.1-8B-Instruct --layer_idx=16 \
        --dataset_path=data/my.jsonl --batch_tokens=32768           # on a GPU
    python extract_activations.py --help                            # every setting with its meaning

Killed or out of disk? Run the same command again: it resumes where it stopped.
"""
import json
import os
import time

from sae.config import answer_help

answer_help(__doc__, __file__)  # -h/--help answers here, before torch and transformers load

import numpy as np
import torch
from tqdm import tqdm

from sae import chat, dist, forward, lm, runtime
from sae.activations import ResumeMismatch, StreamingNpzWriter, examples_between, open_activations
from sae.config import configure, fail
from sae.files import (NO_SPACE, Busy, activations_path, extract_metrics_path, lock_output, share_path, unwritable,
                       write_text_atomic)
from sae.provenance import differences, extraction_record, make_record
from sae.data import DatasetError, iter_examples, resolve_label_field, sha256_file

# ---- model
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # Hugging Face id (from the local cache), a local folder, or a .gguf file
CACHE_DIR = None  # Hugging Face cache folder to look in; None = the default (~/.cache/huggingface/hub)
DEVICE = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"
DTYPE = "auto"  # weights and compute: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16", "float16"
DEVICE_MAP = None  # None = whole model on DEVICE; "auto" spreads a large model over GPUs with accelerate
# ---- data
DATASET_PATH = "data/cognitive_actions_sample.jsonl"  # JSONL (one example per line), .csv or .parquet
TEXT_FIELD = "text"  # field holding the text; records without it may have a `messages` list instead
LABEL_FIELD = "auto"  # "auto" (primary_cognitive_action, else cognitive_action), a field name, or None
CHAT_TEMPLATE = True  # format each example with the model's chat template as in fine-tuning
MAX_LENGTH = 512  # tokens per example after the template; longer examples are cut (and counted)
# ---- extraction
LAYER_IDX = 12  # output of decoder block 12 (0-based; blocks.12.hook_resid_post); a list for several
BATCH_TOKENS = 8192  # token budget of one padded forward batch (longest example × batch size)
STORE_DTYPE = "float16"  # "float16" (half the disk) or "float32"
OUTPUT_DIR = "activations"  # writes OUTPUT_DIR/activations_layer{L}.npz
QUIET = False  # no progress bars: for scripts and logs
# -----------------------------------------------------------------------------
config = configure(globals(), also={"LAYER_IDX": (list,), "LABEL_FIELD": (type(None),)})
# -----------------------------------------------------------------------------
WINDOW_TOKENS = 8 * BATCH_TOKENS  # examples are length-sorted within windows of this many tokens, which
#                                   are written (and resumable) in dataset order; memory is bounded by it

# ---- settings check
layers = LAYER_IDX if isinstance(LAYER_IDX, list) else [LAYER_IDX]
if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
    fail(f"LAYER_IDX={LAYER_IDX!r} must be an int or a non-empty list of ints")
layers = sorted(set(layers))
if MAX_LENGTH < 2:
    fail(f"MAX_LENGTH={MAX_LENGTH} is too small; use at least 2 tokens (e.g. --max_length=512)")
if BATCH_TOKENS < 1:
    fail(f"BATCH_TOKENS={BATCH_TOKENS} must be positive (e.g. --batch_tokens=8192)")
if STORE_DTYPE not in ("float16", "float32"):
    fail(f"STORE_DTYPE={STORE_DTYPE!r} is not supported; use 'float16' or 'float32'")
if DTYPE not in ("auto", "float32", "bfloat16", "float16"):
    fail(f"DTYPE={DTYPE!r} is not supported; use 'auto', 'float32', 'bfloat16' or 'float16'")
if problem := unwritable(OUTPUT_DIR):
    fail(f"OUTPUT_DIR={OUTPUT_DIR} is not a writable folder ({problem}); point --output_dir at one")

# ---- data: validate every line before spending time on the model
try:
    label_field = resolve_label_field(DATASET_PATH, LABEL_FIELD)
    n_examples = sum(1 for _ in iter_examples(DATASET_PATH, TEXT_FIELD, label_field))
except DatasetError as e:
    fail(str(e))
dataset_sha256 = sha256_file(DATASET_PATH)

# ---- model config and tokenizer (the weights come after the cheap checks)
if QUIET:
    runtime.quiet_libraries()
device = runtime.pick_device(DEVICE)
if device.type == "cuda" and not torch.cuda.is_available():
    fail(f"DEVICE={DEVICE} but CUDA is not available here; use --device=cpu or --device=auto")
device = dist.setup(device)  # under torchrun: this process's GPU, and the process group
dtype = runtime.pick_dtype(DTYPE, device)
if device.type == "cpu":
    runtime.keep_freed_memory()
try:
    location = lm.resolve_model(MODEL_NAME, CACHE_DIR)
except lm.ModelNotFound as e:
    fail(str(e))
try:
    model_config = lm.load_config(location)
except Exception as e:  # transformers and gguf raise many types for a damaged or foreign file
    fail(lm.unloadable(MODEL_NAME, e))
n_blocks = lm.n_layers(model_config)
bad = [x for x in layers if not 0 <= x < n_blocks]
if bad:
    fail(f"LAYER_IDX={LAYER_IDX} is out of range for {MODEL_NAME}, which has {n_blocks} decoder blocks; "
         f"use 0..{n_blocks - 1}")
try:
    tokenizer = lm.load_tokenizer(location)
except Exception as e:
    fail(lm.unloadable(MODEL_NAME, e))
if not tokenizer.is_fast:
    fail(f"the tokenizer of {MODEL_NAME} is not a fast tokenizer, which is needed to tell template tokens "
         f"from content; use a model with a tokenizer.json")
use_template = CHAT_TEMPLATE and chat.warn_no_template(tokenizer)

ids_per_example, roles_per_example, labels, example_index = [], [], [], []
n_cut_examples = n_cut_tokens = 0
for line_index, messages, label in iter_examples(DATASET_PATH, TEXT_FIELD, label_field):
    ids, roles, cut = chat.tokenize_example(tokenizer, messages, use_template, MAX_LENGTH)
    ids_per_example.append(ids)
    roles_per_example.append(roles)
    labels.append(label)
    example_index.append(line_index)
    n_cut_examples += cut > 0
    n_cut_tokens += cut
lengths = np.array([len(x) for x in ids_per_example], dtype=np.int64)
offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
n_tokens = int(offsets[-1])
d_model = int(getattr(model_config, "text_config", model_config).hidden_size)

print(f"Model: {MODEL_NAME} ({location.source}), {n_blocks} blocks, hidden dimension {d_model}, "
      f"{dtype} on {device}")
print(f"Layers: {', '.join(map(str, layers))} (output of decoder block; resid_post)")
print(f"Examples: {n_examples} from {DATASET_PATH} (labels: {label_field or 'none'}), chat template "
      f"{'on' if use_template else 'off'}")
print(f"Sequence lengths: min {lengths.min()}, max {lengths.max()}, mean {lengths.mean():.1f}; "
      f"total tokens {n_tokens}")
print(f"Truncated to MAX_LENGTH={MAX_LENGTH}: {n_cut_examples} examples ({n_cut_tokens} tokens cut)")

# ---- this process's share: all examples, or under torchrun a contiguous range balanced by token count
rank, world = dist.rank(), dist.world()
first, last = dist.share_by_tokens(offsets, world)[rank:rank + 2] if world > 1 else (0, n_examples)
out_paths = {L: activations_path(OUTPUT_DIR, L) for L in layers}
part_paths = {L: share_path(p, rank, world) if world > 1 else p for L, p in out_paths.items()}
progress_path = os.path.join(OUTPUT_DIR, f".extract_progress{f'.rank{rank}of{world}' if world > 1 else ''}.json")
try:
    lock_output(progress_path)  # one extraction per output folder (and rank) at a time
except Busy as e:
    fail(str(e))
record = make_record("extract", config, {"dataset": dataset_sha256})  # of this run (resuming); each file has its own
work = {"n_tokens": n_tokens, "layers": layers, "share": [first, last], "format": 1}  # this process's part of it
store_dtype, store_torch_dtype = np.dtype(STORE_DTYPE), getattr(torch, STORE_DTYPE)
meta = {L: {"model": MODEL_NAME, "model_source": location.source, "n_layers": n_blocks, "hidden_size": d_model,
            "dtype": str(dtype).replace("torch.", ""), "store_dtype": STORE_DTYPE, "max_length": MAX_LENGTH,
            "chat_template": use_template, "dataset_path": DATASET_PATH, "dataset_sha256": dataset_sha256,
            "text_field": TEXT_FIELD, "label_field": label_field, "n_examples": n_examples, "n_tokens": n_tokens,
            "n_truncated_examples": int(n_cut_examples), "n_truncated_tokens": int(n_cut_tokens),
            "roles": {"0": "special/template (and each example's first token)", "1": "system", "2": "user",
                      "3": "assistant"}, "layer": L, "hook": f"blocks.{L}.hook_resid_post",
            "dtype_setting": DTYPE, "cache_dir": CACHE_DIR,
            "record": extraction_record(config, L, dataset_sha256)} for L in layers}
# the small arrays of every example, sliced for each file by examples_between
examples = {"offsets": offsets, "token_ids": np.concatenate(ids_per_example), "token_role": np.concatenate(roles_per_example),
            "example_index": np.asarray(example_index), "labels": np.asarray(labels, dtype=str) if label_field else None}


def save_progress(path, record, work, examples_done, writers):
    """What resuming needs: the settings, this process's work, the examples done and each file's writer state."""
    write_text_atomic(path, json.dumps({"record": record, "work": work, "examples_done": examples_done,
                                        "writers": {str(L): w.state() for L, w in writers.items()}}))


share_finished = world > 1 and all(os.path.isfile(p) for p in part_paths.values())
saved = None  # the saved state of an unfinished extraction with these settings: resumed from
if share_finished:
    print(f"rank {rank}: share already extracted ({first}..{last})")
elif os.path.isfile(progress_path):
    with open(progress_path) as f:
        saved = json.load(f)
    if differences(saved.get("record"), record, continuing=True) or saved.get("work") != work or not all(
            os.path.isfile(p + ".partial") for p in part_paths.values()):
        print("Found an unfinished extraction with other settings or data; starting over")
        saved = None
processed, elapsed = 0, 0.0
if not share_finished:
    share_tokens = int(offsets[last] - offsets[first])

    def open_writers(states):
        return {L: StreamingNpzWriter(p, (share_tokens, d_model), store_dtype, state=states and states[str(L)])
                for L, p in part_paths.items()}

    try:
        writers = open_writers(saved and saved["writers"])
    except ResumeMismatch as e:
        print(f"{e}; starting over")
        saved, writers = None, open_writers(None)
    done = saved["examples_done"] if saved else first
    if done > first:
        print(f"Resuming after example {done} of {n_examples}")
    if not saved:
        save_progress(progress_path, record, work, first, writers)

    # ---- load the weights and run
    t0 = time.time()
    try:
        model = lm.load_model(location, device, dtype, DEVICE_MAP)
    except Exception as e:
        fail(lm.unloadable(MODEL_NAME, e))
    print(f"Loaded weights in {time.time() - t0:.1f}s")
    input_device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway

    t_start = time.time()
    bar = tqdm(total=share_tokens, initial=int(offsets[done] - offsets[first]), unit="tok", desc="extract",
               smoothing=0.1, disable=rank > 0 or QUIET or None)
    try:
        start = done
        while start < last:
            end = int(np.searchsorted(offsets, offsets[start] + WINDOW_TOKENS, side="right")) - 1
            end = min(max(end, start + 1), last)
            base = int(offsets[start])
            window = {L: np.empty((int(offsets[end]) - base, d_model), dtype=store_dtype) for L in layers}
            for batch in forward.length_batches(lengths[start:end], BATCH_TOKENS):
                batch = batch + start
                input_ids, mask = forward.pad_right([ids_per_example[i] for i in batch], pad_id)
                hidden = forward.residual_stream(model, input_ids.to(input_device), mask.to(input_device), layers)
                for L in layers:
                    # the real tokens of the batch's examples, one after another, converted where the model ran
                    # (a GPU's copy to the host is then small and unpadded)
                    h = hidden[L]
                    rows = h[mask.to(h.device, torch.bool)].to(store_torch_dtype)
                    if not runtime.all_finite(rows):  # which example, and why
                        for row, i in enumerate(batch):
                            x = h[row, :lengths[i]]
                            line = f"the example on line {example_index[i] + 1} of {DATASET_PATH}"
                            if not torch.isfinite(x).all():
                                fail(f"the model produced NaN or inf at layer {L} for {line}; try --dtype=float32")
                            if not torch.isfinite(x.to(store_torch_dtype)).all():
                                fail(f"activations at layer {L} for {line} overflow {STORE_DTYPE}; "
                                     f"use --store_dtype=float32")
                    rows = rows.cpu().numpy()
                    at = 0
                    for i in batch:
                        a, n = int(offsets[i]) - base, int(lengths[i])
                        window[L][a:a + n] = rows[at:at + n]
                        at += n
                processed += int(lengths[batch].sum())
                bar.update(int(lengths[batch].sum()))
            for L in layers:
                writers[L].append(window[L])
            save_progress(progress_path, record, work, end, writers)
            start = end
        bar.close()
        elapsed = time.time() - t_start
        # ---- outputs: small arrays and metadata, then the rename that makes each file final
        for L in layers:
            writers[L].finish(**examples_between(examples, first, last), meta=meta[L])
        os.remove(progress_path)
    except OSError as e:
        if e.errno in NO_SPACE:
            fail(f"no space left while writing to {OUTPUT_DIR} ({e.strerror}); free some space or point "
                 f"--output_dir elsewhere and run again: it resumes, and no finished-looking file was left")
        raise

# ---- under torchrun, rank 0 joins the shares in dataset order
if world > 1:
    dist.barrier()
    if rank == 0:
        for L, path in out_paths.items():
            shares = [share_path(path, r, world) for r in range(world)]
            writer = StreamingNpzWriter(path, (n_tokens, d_model), store_dtype)
            for share in shares:
                part = open_activations(share)
                for s in range(0, part.n_tokens, WINDOW_TOKENS):
                    writer.append(part.read_rows(s, min(s + WINDOW_TOKENS, part.n_tokens)))
            writer.finish(**examples, meta=meta[L])
            for share in shares:
                os.remove(share)
    processed, elapsed = dist.sum_and_max(processed, elapsed)
    dist.barrier()
    dist.finish()

if rank == 0:
    for L, path in out_paths.items():
        print(f"Saved {path} ({os.path.getsize(path) / 2**20:.1f} MiB): {n_tokens} tokens × {d_model}")
    rate = processed / elapsed if elapsed > 0 else None
    print(f"Throughput: {rate or float('nan'):.0f} tokens/s ({processed} tokens in {elapsed:.1f}s"
          f"{f' on {world} processes' if world > 1 else ''})")
    write_text_atomic(extract_metrics_path(OUTPUT_DIR), json.dumps(
        {"tokens": processed, "seconds": elapsed, "tokens_per_s": rate, "processes": world, "layers": layers,
         "peak_gpu_memory_bytes": runtime.peak_gpu_memory(device)}, indent=2))

dist.leave()  # under torchrun: exit without the interpreter teardown that can abort (see sae/dist.py)
