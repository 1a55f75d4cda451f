"""The whole job: extract activations, train the SAE, interpret its features; each step its own process.

    python run_pipeline.py                                   # SmolLM2-135M-Instruct on the sample data, CPU or GPU
    python run_pipeline.py --layer_idx=18 --m=512 --k=16     # settings go to every script that has them
    python run_pipeline.py configs/llama8b.py                # a config file of NAME = value lines
    python run_pipeline.py --steps=train,interpret --force   # pick steps; --force reruns even when up to date
    python run_pipeline.py --nproc=2                         # extraction and training on 2 processes (torchrun)
    OPENAI_API_KEY=sk-... python run_pipeline.py             # with LLM descriptions of the features

A setting (`--name=value`, `--name value`, or a line of a config file such as configs/llama8b.py) is passed
to every script whose config block has that name (see each script's --help); one that no script has is an
error. The files between steps are passed explicitly:
OUTPUT_DIR/activations_layer{LAYER_IDX}.npz and checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt. A step whose
outputs exist and record the same settings and inputs (each output holds a record of the settings and the
sha256 of the files it was made from: sae/provenance.py) is skipped, so a rerun only redoes what changed.
No prompts, ever.
"""
import json
import os
import subprocess
import sys
import time

import pandas as pd

from sae.activations import open_activations
from sae.config import ConfigError, command_line, fail, parse_value, script_knobs
from sae.data import sha256_file
from sae.launch import launcher
from sae.files import activations_path, checkpoint_path
from sae.provenance import differences, interpretation_inputs, interpretation_record_path, make_record, read_record
from sae.report import feature_table

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"extract": "extract_activations.py", "train": "train_sae.py", "interpret": "interpret_sae.py"}
SET_BY_PIPELINE = {"ACTIVATIONS_PATH", "SAE_CHECKPOINT"}  # the paths between steps

# ---- command line: flags, and settings routed to the scripts that have them
knobs = {step: script_knobs(os.path.join(ROOT, script)) for step, script in SCRIPTS.items()}
force, steps, settings, nproc = False, list(SCRIPTS), {}, 1
if any(a in ("-h", "--help") for a in sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
try:
    command = command_line(sys.argv[1:], flags=("force",))
except ConfigError as e:
    fail(str(e))
for name, raw, where in command:
    if raw is None:  # the one flag
        force = True
        continue
    if name.lower() == "nproc":
        if not raw.isdigit() or int(raw) < 1:
            fail(f"{where}: nproc must be a positive number of processes")
        nproc = int(raw)
        continue
    if name.lower() == "steps":
        steps = [s.strip() for s in raw.split(",") if s.strip()]
        unknown = [s for s in steps if s not in SCRIPTS]
        if unknown or not steps:
            fail(f"{where} names unknown steps {unknown}; choose from {', '.join(SCRIPTS)}")
        continue
    name = name.upper().replace("-", "_")
    if name in SET_BY_PIPELINE:
        fail(f"{name} (in {where}) is set by the pipeline from the previous step's output; run the script on "
             f"its own to use another file")
    owners = [step for step in SCRIPTS if name in knobs[step]]
    if not owners:
        valid = sorted({k.lower() for ks in knobs.values() for k in ks} - {k.lower() for k in SET_BY_PIPELINE})
        fail(f"unknown setting {name.lower()} (in {where}): no script has it; valid settings are: {', '.join(valid)}")
    settings[name] = (raw, owners)

# ---- each script's resolved settings, and the paths between steps
config = {step: dict(knobs[step]) for step in SCRIPTS}
args = {step: [] for step in SCRIPTS}
for name, (raw, owners) in settings.items():
    for step in owners:
        config[step][name] = parse_value(raw, knobs[step][name])
        args[step].append(f"--{name}={raw}")  # upper case: torchrun's parser would claim e.g. --m
layer = config["extract"]["LAYER_IDX"]
if not isinstance(layer, int):
    fail(f"--layer_idx={layer} must be one layer for the pipeline; extract several with extract_activations.py")
dataset = config["extract"]["DATASET_PATH"]
acts_path = activations_path(config["extract"]["OUTPUT_DIR"], layer)
ckpt_path = checkpoint_path(config["train"]["RUN_NAME"], config["train"]["M"], config["train"]["K"])
for step, explicit in (("train", {"ACTIVATIONS_PATH": acts_path}),
                       ("interpret", {"ACTIVATIONS_PATH": acts_path, "SAE_CHECKPOINT": ckpt_path,
                                      "DATASET_PATH": dataset})):
    for name, value in explicit.items():
        config[step][name] = value
        args[step].append(f"--{name}={value}")


def readable(read, path):
    """read(path), or None (with a note) when the file is truncated, corrupt or not ours: the step is redone."""
    try:
        return read(path)
    except Exception as e:  # any failure to read an output only means the output is not usable
        print(f"{path} cannot be read ({type(e).__name__}); it is stale and the step runs again")
        return None


def up_to_date(outputs: list[str], wanted) -> str | None:
    """Why a step's outputs are current, or None when it must run: they all exist and the last one holds the
    record `wanted()` (called only then: it hashes the inputs) gives."""
    if not all(os.path.isfile(p) for p in outputs):
        return None
    stored = readable(read_record, outputs[-1])
    if stored is None or differences(stored, wanted()):
        return None
    return f"{', '.join(outputs)} record{'s' if len(outputs) == 1 else ''} the same settings and inputs"


llm_now = bool(config["interpret"]["OPENAI_BASE_URL"] or os.environ.get("OPENAI_BASE_URL")
               or os.environ.get("OPENAI_API_KEY"))
csv, html = config["interpret"]["OUTPUT_CSV"], config["interpret"]["REPORT_HTML"]
outputs = {"extract": [acts_path], "train": [ckpt_path], "interpret": [csv, html, interpretation_record_path(html)]}
wanted = {"extract": lambda: make_record("extract", config["extract"], {"dataset": sha256_file(dataset)}),
          "train": lambda: make_record("train", config["train"], {"activations": sha256_file(acts_path)}, nproc),
          "interpret": lambda: make_record("interpret", config["interpret"],
                                           interpretation_inputs(ckpt_path, dataset, llm_now))}
inputs = {"extract": [dataset], "train": [acts_path], "interpret": [ckpt_path, dataset]}


# ---- the steps, in order
t_total = time.time()
for n, step in enumerate(SCRIPTS, 1):
    if step not in steps:
        continue
    # one process per GPU or CPU share for the steps that split their work
    command = [*launcher(sys.executable, nproc if step in ("extract", "train") else 1), os.path.join(ROOT, SCRIPTS[step]),
               *args[step]]
    print(f"\n==== step {n}/3: {step} ({' '.join(command[1:]).replace(ROOT + os.sep, '')})", flush=True)
    current = not force and all(os.path.isfile(p) for p in inputs[step])  # else the step says what is missing
    reason = up_to_date(outputs[step], wanted[step]) if current else None
    if reason:
        print(f"up to date, skipped: {reason}")
        continue
    t0 = time.time()
    code = subprocess.run(command).returncode
    if code != 0:
        fail(f"step '{step}' ({SCRIPTS[step]}) failed with exit code {code}; see its message above", code)
    print(f"==== {step} done in {time.time() - t0:.1f}s", flush=True)

# ---- summary
print(f"\n==== summary (pipeline {time.time() - t_total:.1f}s)")


def size(path):
    return f"{os.path.getsize(path) / 2**20:.1f} MiB" if os.path.isfile(path) else "missing"


def read_checkpoint(path):
    """The checkpoint dict, its tensors memory-mapped: the summary reads only its metrics."""
    import torch  # here only: the steps run in their own processes, the pipeline needs torch for this alone
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


meta = readable(lambda p: open_activations(p).meta, acts_path) if os.path.isfile(acts_path) else None
if meta is not None:
    print(f"activations   {acts_path} ({size(acts_path)}): {meta['n_examples']} examples, {meta['n_tokens']} tokens, "
          f"{meta['model']} layer {meta['layer']}")
ckpt = readable(read_checkpoint, ckpt_path) if os.path.isfile(ckpt_path) else None
if isinstance(ckpt, dict):
    m = ckpt.get("metrics", {})
    if m:
        lm_line = f", ΔLM loss {m['lm_eval']['delta_lm_loss_pct']:+.2f}%" if "ce_clean" in m.get("lm_eval", {}) else ""
        content = m.get("val_nmse_content")
        content = f" ({content:.4f} on content tokens)" if content is not None else ""
        print(f"checkpoint    {ckpt_path} ({size(ckpt_path)}): val normalized MSE {m['val_nmse']:.4f}{content}, "
              f"{m['l0']:.2f} active features/token, {100 * m['dead_ratio']:.1f}% dead, {m['epochs']} epochs{lm_line}")
        if m.get("labels"):
            lab = m["labels"]
            print(f"labels        {lab['labels_covered']} of {lab['n_labels']} are some feature's own best label at AUROC "
                  f">= {lab['auroc_threshold']}; probe on validation examples: SAE features "
                  f"{100 * lab['probe_sae_accuracy']:.1f}%, raw activations {100 * lab['probe_raw_accuracy']:.1f}%")
if os.path.isfile(interpretation_record_path(html)):
    record = readable(read_json, interpretation_record_path(html)) or {}
    print(f"interpretation {csv} ({size(csv)}), {html} ({size(html)}): {record.get('n_described', 0)} of "
          f"{record.get('n_selected', 0)} selected features described by an LLM")
    table = readable(pd.read_csv, csv) if os.path.isfile(csv) else None
    if table is not None and {"neuron_idx", "prevalence", "interpretation"} <= set(table.columns):
        print(f"\nSelected features ({len(table)}; share of examples active; description):")
        print("\n".join(feature_table(zip(table.neuron_idx, table.prevalence, table.interpretation.astype(str)))))
