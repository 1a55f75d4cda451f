"""What each output was made from, and whether it is stale: one record per output, written, read and
compared here for every step (run_pipeline.py's skipping, and each script's continuing of an interrupted run).

A record is a dict: "step" (extract, train or interpret), "config" (the script's resolved settings, secrets
redacted, less the settings in NO_EFFECT), "inputs" ({name: sha256 of each input file, or for the
interpretation whether an LLM is used}), "processes" (how
many torchrun processes made it) and "complete" (False: the output exists but its work is not finished,
such as an interpretation whose LLM did not describe every feature). It lives inside the output it
describes: the activations file's meta, the checkpoint dict, and the interpretation's record file
(interpretation_record_path, beside report.html).
"""
import json
import os

import numpy as np

from .config import redacted
from .data import sha256_file

# Settings that never change a step's output (batching does not change the activations): they are not
# recorded, so changing them neither makes an output stale nor stops an interrupted run from continuing.
NO_EFFECT = {"extract": ("BATCH_TOKENS",), "train": ("RESUME",), "interpret": ("FEATURE_TABLE",)}
# Settings an interrupted run may change when it continues: they act after the work done so far (how long
# to go on, where to run, what to measure and write at the end). They still make a finished output stale.
MAY_CHANGE_WHEN_CONTINUING = {"extract": (), "interpret": (),
                              "train": ("N_EPOCHS", "DEVICE", "BF16", "EXPORT_SAELENS", "EVAL_LM", "EVAL_MAX_EXAMPLES",
                                        "EVAL_BATCH_TOKENS")}


def make_record(step: str, config: dict, inputs: dict[str, str], processes: int = 1, complete: bool = True) -> dict:
    """The record of an output that `step` makes (or would make) with these settings from these inputs."""
    settings = {k: v for k, v in redacted(config).items() if k not in NO_EFFECT[step]}
    return _plain({"step": step, "config": settings, "inputs": dict(inputs), "processes": processes,
                   "complete": complete})


def _plain(value):
    """As it reads back from JSON (tuples become lists), so that stored and fresh records compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def differences(stored: dict | None, wanted: dict, continuing: bool = False) -> list[str]:
    """What differs between an output's record and the one wanted now (empty: the output is current). With
    `continuing`, the settings an interrupted run may change are not compared, nor is completeness."""
    if not isinstance(stored, dict) or stored.get("step") != wanted["step"]:
        return ["no record of how it was made"]
    free = MAY_CHANGE_WHEN_CONTINUING[wanted["step"]] if continuing else ()
    old, new = stored.get("config", {}), wanted["config"]
    found = [f"setting {k}" for k in sorted(set(old) | set(new)) if k not in free and old.get(k) != new.get(k)]
    found += [f"input {k}" for k in sorted(set(stored.get("inputs", {})) | set(wanted["inputs"]))
              if stored.get("inputs", {}).get(k) != wanted["inputs"].get(k)]
    if stored.get("processes", 1) != wanted["processes"]:
        found.append("number of processes")
    if not continuing and not stored.get("complete", True):
        found.append("unfinished work")
    return found


def extraction_record(config: dict, layer: int, dataset_sha256: str) -> dict:
    """The record of one activations file: the extraction's settings with LAYER_IDX set to the file's own layer,
    so that a file is current whichever list of layers it was extracted with (a sweep adds layers without
    re-extracting the others)."""
    return make_record("extract", {**config, "LAYER_IDX": layer}, {"dataset": dataset_sha256})


def interpretation_inputs(checkpoint: str, dataset: str, llm: bool, sweep_csv: str | None = None) -> dict:
    """The interpretation's inputs: the checkpoint, the dataset, whether an LLM describes the features, and the
    sweep's table when the report shows one."""
    inputs = {"checkpoint": sha256_file(checkpoint), "dataset": sha256_file(dataset), "llm": "on" if llm else "off"}
    if sweep_csv:
        inputs["sweep"] = sha256_file(sweep_csv)
    return inputs


def interpretation_record_path(report_html: str) -> str:
    """The interpretation's record: report.html → report.json."""
    return os.path.splitext(report_html)[0] + ".json"


def read_record(path: str) -> dict | None:
    """The record inside an output: an activations .npz (its meta), a checkpoint .pt, or a record .json;
    None when it holds none. Raises when the file cannot be read at all."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["meta"])).get("record")
    if path.endswith(".pt"):
        import torch
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the weights are not read
        return ckpt.get("record") if isinstance(ckpt, dict) and "resume" not in ckpt else None
    with open(path, encoding="utf-8") as f:
        return json.load(f).get("record")
