"""The whole job: extract activations, train the SAE, interpret its features; each step its own process.

    python run_pipeline.py                                   # SmolLM2-135M-Instruct on the sample data, CPU or GPU
    python run_pipeline.py --layer_idx=18 --m=512 --k=16     # settings go to every script that has them
    python run_pipeline.py configs/llama8b.py                # a config file of NAME = value lines
    python run_pipeline.py --steps=train,interpret --force   # pick steps; --force reruns even when up to date
    python run_pipeline.py --nproc=2                         # extraction and training on 2 processes (torchrun)
    python run_pipeline.py --layer_idx=[6,12,18,24] --m=[128,256,512]   # a sweep: one SAE per (layer, M, K)
    OPENAI_API_KEY=sk-... python run_pipeline.py             # with LLM descriptions of the features

A setting (`--name=value`, `--name value`, or a line of a config file such as configs/llama8b.py) is passed
to every script whose config block has that name (see each script's --help); one that no script has is an
error. The files between steps are passed explicitly:
OUTPUT_DIR/activations_layer{LAYER_IDX}.npz and checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt. A step whose
outputs exist and record the same settings and inputs (each output holds a record of the settings and the
sha256 of the files it was made from: sae/provenance.py) is skipped, so a rerun only redoes what changed.
No prompts, ever.

A sweep: LAYER_IDX, M and K each take a list. Extraction runs once for all layers; training runs once per
(layer, M, K) cell, each a normal checkpoint (with a list of layers the run name gets the layer:
checkpoints/{RUN_NAME}_layer{L}/SAE_M={M}_K={K}.pt); sweep.csv (beside OUTPUT_CSV), the console and the
report compare the cells, and the best one by the rule in sae/sweep.py (the most labels covered among the
cells whose ΔLM loss is at most --max_delta_lm percent, default 10) is interpreted into OUTPUT_CSV and
REPORT_HTML. --interpret_cells=all interprets every cell too (its outputs named after it, such as
report_layer6_M128_K8.html). Cells that are up to date are skipped, so a longer list extends a sweep.
"""
import functools
import json
import os
import subprocess
import sys
import time

import pandas as pd

from sae import sweep
from sae.activations import open_activations
from sae.config import ConfigError, command_line, fail, parse_value, script_knobs
from sae.data import sha256_file
from sae.launch import launcher
from sae.files import activations_path, checkpoint_path, write_text_atomic
from sae.provenance import (differences, extraction_record, interpretation_inputs, interpretation_record_path,
                            make_record, read_record)
from sae.report import feature_table

ROOT = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"extract": "extract_activations.py", "train": "train_sae.py", "interpret": "interpret_sae.py"}
SET_BY_PIPELINE = {"ACTIVATIONS_PATH", "SAE_CHECKPOINT", "SWEEP_CSV"}  # the paths between steps

# ---- command line: flags, and settings routed to the scripts that have them
knobs = {step: script_knobs(os.path.join(ROOT, script)) for step, script in SCRIPTS.items()}
force, steps, settings, nproc, interpret_cells, max_delta_lm = False, list(SCRIPTS), {}, 1, "best", sweep.MAX_DELTA_LM
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
    if name.lower() == "interpret_cells":
        if raw not in ("best", "all"):
            fail(f"{where}: interpret_cells must be best (the sweep's best cell) or all (every cell)")
        interpret_cells = raw
        continue
    if name.lower() == "max_delta_lm":
        try:
            max_delta_lm = float(raw)
        except ValueError:
            fail(f"{where}: max_delta_lm must be a number of percent, such as 10")
        continue
    name = name.upper().replace("-", "_")
    if name in SET_BY_PIPELINE:
        fail(f"{name} (in {where}) is set by the pipeline from the previous step's output; run the script on "
             f"its own to use another file")
    owners = [step for step in SCRIPTS if name in knobs[step]]
    if not owners:
        valid = sorted({k.lower() for ks in knobs.values() for k in ks} - {k.lower() for k in SET_BY_PIPELINE})
        fail(f"unknown setting {name.lower()} (in {where}): no script has it; valid settings are: {', '.join(valid)}")
    settings[name] = (raw, owners, where)

# ---- the swept settings (LAYER_IDX, M, K: an int, or a list for a sweep), and the others for every script
swept = {}
for name in sweep.SWEPT:
    raw, owners, where = settings.pop(name, (None, None, name))
    value = knobs["train" if name != "LAYER_IDX" else "extract"][name] if raw is None else parse_value(raw, 0)
    try:
        swept[name] = (sweep.parse_list(name, value, where), isinstance(value, list))
    except ValueError as e:
        fail(str(e))
is_sweep = any(listed for _, listed in swept.values())
layers_listed = swept["LAYER_IDX"][1]
cells = [sweep.Cell(L, m, k) for L in swept["LAYER_IDX"][0] for m in swept["M"][0] for k in swept["K"][0]]
config = {step: dict(knobs[step]) for step in SCRIPTS}
args = {step: [] for step in SCRIPTS}
for name, (raw, owners, _) in settings.items():
    for step in owners:
        config[step][name] = parse_value(raw, knobs[step][name])
        args[step].append(f"--{name}={raw}")  # upper case: torchrun's parser would claim e.g. --m
dataset = config["extract"]["DATASET_PATH"]


def with_settings(step: str, values: dict) -> tuple[dict, list[str]]:
    """The step's config and arguments with these settings too (later arguments win in the scripts)."""
    return {**config[step], **values}, args[step] + [f"--{k}={v}" for k, v in values.items()]


def acts_of(layer: int) -> str:
    return activations_path(config["extract"]["OUTPUT_DIR"], layer)


def cell_settings(cell) -> dict:
    """A cell's settings for training and interpretation: its M, K, activations, and a run name that holds
    the layer when layers are swept (checkpoints/{RUN_NAME}_layer{L}/SAE_M={M}_K={K}.pt)."""
    run = config["train"]["RUN_NAME"] + (f"_layer{cell.layer}" if layers_listed else "")
    return {"M": cell.m, "K": cell.k, "RUN_NAME": run, "ACTIVATIONS_PATH": acts_of(cell.layer)}


def ckpt_of(cell) -> str:
    s = cell_settings(cell)
    return checkpoint_path(s["RUN_NAME"], s["M"], s["K"])


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
    if force or not all(os.path.isfile(p) for p in outputs):
        return None
    stored = readable(read_record, outputs[-1])
    if stored is None or differences(stored, wanted()):
        return None
    return f"{', '.join(outputs)} record{'s' if len(outputs) == 1 else ''} the same settings and inputs"


def run_step(n: int, step: str, step_args: list[str], what: str = ""):
    """Run one script (under torchrun for the steps that split their work) and stop the pipeline if it fails."""
    command = [*launcher(sys.executable, nproc if step in ("extract", "train") else 1),
               os.path.join(ROOT, SCRIPTS[step]), *step_args]
    print(f"\n==== step {n}/3: {step}{what} ({' '.join(command[1:]).replace(ROOT + os.sep, '')})", flush=True)
    t0 = time.time()
    code = subprocess.run(command).returncode
    if code != 0:
        fail(f"step '{step}' ({SCRIPTS[step]}) failed with exit code {code}; see its message above", code)
    print(f"==== {step}{what} done in {time.time() - t0:.1f}s", flush=True)


def read_checkpoint(path):
    """The checkpoint dict, its tensors memory-mapped: the pipeline reads only its metrics."""
    import torch  # here only: the steps run in their own processes, the pipeline needs torch for this alone
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


t_total = time.time()
sha = functools.cache(sha256_file)  # each input hashed once (only after the step that writes it)
llm_now = bool(config["interpret"]["OPENAI_BASE_URL"] or os.environ.get("OPENAI_BASE_URL")
               or os.environ.get("OPENAI_API_KEY"))
csv_path, html = config["interpret"]["OUTPUT_CSV"], config["interpret"]["REPORT_HTML"]
sweep_csv = os.path.join(os.path.dirname(csv_path), "sweep.csv") if is_sweep else None

# ---- step 1: extraction, once for every layer whose file is missing or stale (one forward pass for all)
if "extract" in steps:
    stale = [L for L in swept["LAYER_IDX"][0] if not os.path.isfile(dataset) or not up_to_date(
        [acts_of(L)], lambda L=L: extraction_record(config["extract"], L, sha(dataset)))]
    if stale:
        _, step_args = with_settings("extract", {"LAYER_IDX": stale if layers_listed else stale[0]})
        run_step(1, "extract", step_args)
    else:
        print(f"\n==== step 1/3: extract\nup to date, skipped: {', '.join(map(acts_of, swept['LAYER_IDX'][0]))} "
              f"record the same settings and inputs")

# ---- step 2: training, once per cell
for i, cell in enumerate(cells if "train" in steps else []):
    what = f" {cell.name} ({i + 1}/{len(cells)})" if is_sweep else ""
    cfg, step_args = with_settings("train", cell_settings(cell))
    if not os.path.isfile(cfg["ACTIVATIONS_PATH"]):
        run_step(2, "train", step_args, what)  # the script says what is missing
        continue
    reason = up_to_date([ckpt_of(cell)], lambda: make_record("train", cfg, {"activations": sha(cfg["ACTIVATIONS_PATH"])},
                                                              nproc))
    if reason:
        print(f"\n==== step 2/3: train{what}\nup to date, skipped: {reason}")
    else:
        run_step(2, "train", step_args, what)

# ---- the sweep's comparison and its best cell
best = cells[0]
rows = []
if is_sweep and steps != ["extract"]:
    for cell in cells:
        ckpt = readable(read_checkpoint, ckpt_of(cell)) if os.path.isfile(ckpt_of(cell)) else None
        if not isinstance(ckpt, dict) or not ckpt.get("metrics"):
            fail(f"{ckpt_of(cell)} (cell {cell.name}) is missing or unfinished; run the train step "
                 f"(--steps=train or no --steps) to finish the sweep")
        rows.append(sweep.row(cell, ckpt_of(cell), ckpt["metrics"]))
    index, rule = sweep.choose(rows, max_delta_lm)
    best = cells[index]
    write_text_atomic(sweep_csv, sweep.to_csv(rows))
    print(f"\n==== sweep: {len(cells)} cells compared in {sweep_csv}; best {best.name} by its rule: {rule}", flush=True)

# ---- step 3: interpretation of the best cell, or of every cell
to_interpret = [best] + ([c for c in cells if c != best] if interpret_cells == "all" else [])
for cell in to_interpret if "interpret" in steps else []:
    outputs = {"OUTPUT_CSV": csv_path, "REPORT_HTML": html}
    if cell != best:  # interpretations.csv and report.html are the best cell's; the others' names say their cell
        outputs = {k: f"{os.path.splitext(v)[0]}_{cell.name}{os.path.splitext(v)[1]}" for k, v in outputs.items()}
    cfg, step_args = with_settings("interpret", {**cell_settings(cell), "SAE_CHECKPOINT": ckpt_of(cell),
                                                 "DATASET_PATH": dataset, **outputs,
                                                 "FEATURE_TABLE": False,  # the summary ends with it
                                                 **({"SWEEP_CSV": sweep_csv} if is_sweep else {})})
    what = f" {cell.name}" if is_sweep else ""
    reason = None
    if all(os.path.isfile(p) for p in (ckpt_of(cell), dataset)):  # else the script says what is missing
        reason = up_to_date([outputs["OUTPUT_CSV"], outputs["REPORT_HTML"], interpretation_record_path(outputs["REPORT_HTML"])],
                            lambda: make_record("interpret", cfg, interpretation_inputs(ckpt_of(cell), dataset, llm_now,
                                                                                        sweep_csv)))
    if reason:
        print(f"\n==== step 3/3: interpret{what}\nup to date, skipped: {reason}")
    else:
        run_step(3, "interpret", step_args, what)

# ---- summary
print(f"\n==== summary (pipeline {time.time() - t_total:.1f}s)")
if rows:
    print(f"sweep         {sweep_csv}: {len(rows)} cells (* = best, {best.name}; see the verdict column for why)")
    print("\n".join(sweep.console_table(rows)))
acts_path, ckpt_path = acts_of(best.layer), ckpt_of(best)


def size(path):
    return f"{os.path.getsize(path) / 2**20:.1f} MiB" if os.path.isfile(path) else "missing"


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
            means = lab.get("probe_sae_mean_accuracy")  # absent from checkpoints of older versions
            means = "" if means is None else f"feature means {100 * means:.1f}%, "
            print(f"labels        {lab['labels_covered']} of {lab['n_labels']} are some feature's own best label at AUROC "
                  f">= {lab['auroc_threshold']}; probe on {lab['probe_val_examples']} validation examples: SAE "
                  f"feature maxima {100 * lab['probe_sae_accuracy']:.1f}%, {means}raw activations "
                  f"{100 * lab['probe_raw_accuracy']:.1f}%")
if os.path.isfile(interpretation_record_path(html)):
    record = readable(read_json, interpretation_record_path(html)) or {}
    print(f"interpretation {csv_path} ({size(csv_path)}), {html} ({size(html)}): {record.get('n_described', 0)} of "
          f"{record.get('n_selected', 0)} selected features described by an LLM")
    table = readable(pd.read_csv, csv_path) if os.path.isfile(csv_path) else None
    if table is not None and {"neuron_idx", "prevalence", "interpretation"} <= set(table.columns):
        print("\n" + record.get("table_heading", f"Selected features ({len(table)}; share of examples active; description):"))
        print("\n".join(feature_table(zip(table.neuron_idx, table.prevalence, table.interpretation.astype(str)))))
