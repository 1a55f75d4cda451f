"""The whole job: extract activations, train the SAE, interpret its features; each step its own process.

    python run_pipeline.py                                   # SmolLM2-135M-Instruct on the sample data, CPU or GPU
    python run_pipeline.py --layer_idx=18 --m=512 --k=16     # settings go to every script that has them
    python run_pipeline.py --steps=train,interpret --force   # pick steps; --force reruns even when up to date
    python run_pipeline.py --nproc=2                         # extraction and training on 2 processes (torchrun)
    OPENAI_API_KEY=sk-... python run_pipeline.py             # with LLM descriptions of the features

A `--name=value` setting is passed to every script whose config block has that name (see each script's
--help); one that no script has is an error. The files between steps are passed explicitly:
OUTPUT_DIR/activations_layer{LAYER_IDX}.npz and checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt. A step whose
outputs exist and record the same settings and inputs (their metadata holds the resolved config and the
sha256 of what they were made from) is skipped, so a rerun only redoes what changed. No prompts, ever.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd

from sae.checkpoint import checkpoint_path
from sae.config import fail, parse_value, redacted, script_knobs
from sae.data import sha256_file
from sae.files import activations_path
from sae.report import feature_table, read_record

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"extract": "extract_activations.py", "train": "train_sae.py", "interpret": "interpret_sae.py"}
SET_BY_PIPELINE = {"ACTIVATIONS_PATH", "SAE_CHECKPOINT"}  # the paths between steps
NOT_COMPARED = {"train": {"RESUME"}}  # settings that do not change a finished output

# ---- command line: flags, and settings routed to the scripts that have them
knobs = {step: script_knobs(os.path.join(ROOT, script)) for step, script in SCRIPTS.items()}
force, steps, settings, nproc = False, list(SCRIPTS), {}, 1
for arg in sys.argv[1:]:
    if arg in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    if arg == "--force":
        force = True
        continue
    if not arg.startswith("--") or "=" not in arg:
        fail(f"argument {arg!r} is not of the form --name=value, --force or --steps=extract,train,interpret")
    name, raw = arg[2:].split("=", 1)
    if name.lower() == "nproc":
        if not raw.isdigit() or int(raw) < 1:
            fail(f"--nproc={raw} must be a positive number of processes")
        nproc = int(raw)
        continue
    if name.lower() == "steps":
        steps = [s.strip() for s in raw.split(",") if s.strip()]
        unknown = [s for s in steps if s not in SCRIPTS]
        if unknown or not steps:
            fail(f"--steps={raw} names unknown steps {unknown}; choose from {', '.join(SCRIPTS)}")
        continue
    name = name.upper().replace("-", "_")
    if name in SET_BY_PIPELINE:
        fail(f"--{name.lower()} is set by the pipeline from the previous step's output; run the script on its "
             f"own to use another file")
    owners = [step for step in SCRIPTS if name in knobs[step]]
    if not owners:
        valid = sorted({k.lower() for ks in knobs.values() for k in ks} - {k.lower() for k in SET_BY_PIPELINE})
        fail(f"unknown setting --{name.lower()}: no script has it; valid settings are: {', '.join(valid)}")
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


def same(a, b) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def wanted(step) -> dict:
    return {k: v for k, v in config[step].items() if k not in NOT_COMPARED.get(step, ())}


def read_meta(path) -> dict:
    return json.loads(str(np.load(path, allow_pickle=False)["meta"]))


def read_checkpoint(path) -> dict:
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def read_report_record(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return read_record(f.read()) or {}


def readable(read, path):
    """read(path), or None (with a note) when the file is truncated, corrupt or not ours: the step is redone."""
    try:
        return read(path)
    except Exception as e:  # any failure to read an output only means the output is not usable
        print(f"{path} cannot be read ({type(e).__name__}); it is stale and the step runs again")
        return None


def up_to_date(step) -> str | None:
    """Why the step's outputs are current, or None when it must run."""
    if step == "extract":
        if not os.path.isfile(acts_path) or not os.path.isfile(dataset):
            return None
        meta = readable(read_meta, acts_path)
        if meta is None:
            return None
        if same(meta.get("config"), wanted("extract")) and meta.get("dataset_sha256") == sha256_file(dataset):
            return f"{acts_path} matches the settings and {dataset}"
    elif step == "train":
        if not os.path.isfile(ckpt_path) or not os.path.isfile(acts_path):
            return None
        ckpt = readable(read_checkpoint, ckpt_path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("provenance"), dict):
            return None
        stored = {k: v for k, v in ckpt.get("config", {}).items() if k not in NOT_COMPARED["train"]}
        if "resume" not in ckpt and same(stored, wanted("train")) and ckpt["provenance"].get("processes", 1) == \
                nproc and ckpt["provenance"].get("activations_sha256") == sha256_file(acts_path):
            return f"{ckpt_path} is finished, with the same settings and activations"
    else:
        csv, html = config["interpret"]["OUTPUT_CSV"], config["interpret"]["REPORT_HTML"]
        if not (os.path.isfile(csv) and os.path.isfile(html) and os.path.isfile(ckpt_path)):
            return None
        record = readable(read_report_record, html) or {}
        llm_now = bool(config["interpret"]["OPENAI_BASE_URL"] or os.environ.get("OPENAI_BASE_URL")
                       or os.environ.get("OPENAI_API_KEY"))
        if same(record.get("config"), redacted(wanted("interpret"))) and record.get("checkpoint_sha256") == \
                sha256_file(ckpt_path) and record.get("dataset_sha256") == sha256_file(dataset) and \
                (record.get("llm") is not None) == llm_now and \
                (not llm_now or record.get("n_described") == record.get("n_selected")):  # finished its work
            return f"{csv} and {html} match the settings, the checkpoint and the LLM setup"
    return None


# ---- the steps, in order
t_total = time.time()
for n, step in enumerate(SCRIPTS, 1):
    if step not in steps:
        continue
    launcher = [sys.executable]
    if nproc > 1 and step in ("extract", "train"):  # PyTorch's own launcher; one process per GPU or CPU share
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [*launcher, os.path.join(ROOT, SCRIPTS[step]), *args[step]]
    print(f"\n==== step {n}/3: {step} ({' '.join(command[1:]).replace(ROOT + os.sep, '')})", flush=True)
    reason = None if force else up_to_date(step)
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


meta = readable(read_meta, acts_path) if os.path.isfile(acts_path) else None
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
csv, html = config["interpret"]["OUTPUT_CSV"], config["interpret"]["REPORT_HTML"]
if os.path.isfile(html):
    record = readable(read_report_record, html) or {}
    print(f"interpretation {csv} ({size(csv)}), {html} ({size(html)}): {record.get('n_described', 0)} of "
          f"{record.get('n_selected', 0)} selected features described by an LLM")
    table = readable(pd.read_csv, csv) if os.path.isfile(csv) else None
    if table is not None and {"neuron_idx", "prevalence", "interpretation"} <= set(table.columns):
        print(f"\nSelected features ({len(table)}; share of examples active; description):")
        print("\n".join(feature_table(zip(table.neuron_idx, table.prevalence, table.interpretation.astype(str)))))
