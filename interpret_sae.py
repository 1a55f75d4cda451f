"""Interpret a trained SAE: what each feature responds to, how sure we are, how it relates to the labels.

For every example, a feature's activation is its maximum over the example's content tokens (user and
assistant turns outside prefixes that several examples share; or, with INTERPRET_TOKENS="trained", the
tokens the SAE was trained on) and the peak token is kept. Features that fire mainly on the chat template
or on shared prefixes are template features: they are listed apart and never selected by default.
Content features are selected by label association (when the dataset has labels), by prevalence or by
index; each gets its top examples with the peak token marked «like this», random non-activating
examples, its most distinctive peak tokens, its best-matching label, and a description built from these.
With an OpenAI key or any OpenAI-compatible server, an LLM describes each feature instead and an
annotator model scores the description on held-out examples (precision, recall, F1).

    python interpret_sae.py                                   # after extract_activations.py and train_sae.py
    OPENAI_API_KEY=sk-... python interpret_sae.py              # with descriptions and scores
    OPENAI_BASE_URL=http://localhost:8000/v1 python interpret_sae.py --openai_model=Qwen/Qwen2.5-7B-Instruct \
        --annotator_model=Qwen/Qwen2.5-7B-Instruct            # a local vLLM / Ollama / llama.cpp server
    python interpret_sae.py --select_by=prevalence --n_top_neurons=40
    python interpret_sae.py --select_by=[3, 17, 42]

Every LLM answer is cached beside the outputs (llm_cache.jsonl): a rerun, or a run resumed after a
crash, never asks (or pays) twice for the same answer.
"""
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from sae.config import answer_help

answer_help(__doc__, __file__)  # -h/--help answers here, before torch and transformers load

import numpy as np
import pandas as pd
from tqdm import tqdm

from sae import lm, runtime, sweep
from sae.activations import ActivationFileError, open_activations
from sae.checkpoint import CheckpointError, load_checkpoint
from sae.config import configure, fail, redacted
from sae.data import count_examples, sha256_file
from sae.files import NO_SPACE, Busy, checkpoint_path, lock_output, text_writer, unfinished_path, unwritable, write_all_atomic
from sae.features import (auroc, best_labels, content_text, data_description, default_selection,
                          distinctive_tokens, example_features, labels_covered, mark_peak, template_features, token_text)
from sae.interpretation import CSV_COLUMNS, Feature, Source, describe_prompt, score_descriptions
from sae.llm import AuthenticationFailed, CachedChat
from sae.provenance import interpretation_inputs, interpretation_record_path, make_record
from sae.report import feature_table, render_report
from sae.selection import TokenSelection
from sae.stream import NonFiniteActivations

# ---- inputs
ACTIVATIONS_PATH = "activations/activations_layer12.npz"  # written by extract_activations.py
SAE_CHECKPOINT = None  # None = checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt (the training script's naming rule)
RUN_NAME = "cognitive_actions"  # used only to derive SAE_CHECKPOINT
M = 256  # used only to derive SAE_CHECKPOINT
K = 8  # used only to derive SAE_CHECKPOINT
DATASET_PATH = "data/cognitive_actions_sample.jsonl"  # must be the dataset the activations came from
# ---- selection
N_TOP_NEURONS = 20  # features to interpret
SELECT_BY = "auto"  # "auto" (label_auroc when there are labels, else prevalence), "label_auroc", "prevalence", or a list of indices
INTERPRET_TOKENS = "content"  # an example's activation is the maximum over its "content" tokens or its "trained" ones
TEMPLATE_SHARE = 0.5  # features with at least this share of their activation on template positions are template features
N_EXAMPLES = 20  # top activating examples per feature (and as many non-activating ones)
CONTEXT_TOKENS = 12  # tokens shown on each side of the peak token
SEED = 0  # sampling of non-activating examples
# ---- LLM (OpenAI or any OpenAI-compatible server)
OPENAI_MODEL = "gpt-4.1"  # writes the descriptions
ANNOTATOR_MODEL = "gpt-4.1-mini"  # scores them
OPENAI_BASE_URL = None  # None = $OPENAI_BASE_URL, else OpenAI; e.g. "http://localhost:11434/v1" for Ollama
SCORE = True  # score each description on held-out examples (precision, recall, F1)
N_SCORE_EXAMPLES = 10  # held-out activating examples per feature for scoring (and as many non-activating)
TASK_HINT = "first-person texts showing a cognitive action"  # one line of context about the dataset
MAX_RETRIES = 5  # per request, on rate limits, timeouts and 5xx, with exponential backoff
RETRY_BASE_S = 1.0  # first backoff in seconds
TIMEOUT_S = 60.0  # per request
N_WORKERS = 8  # requests in flight at once
DEVICE = "auto"  # for running the SAE: "auto", "cpu", "cuda"
QUIET = False  # no progress bars: for scripts and logs
FEATURE_TABLE = True  # end with a table of the selected features (run_pipeline.py prints it in its summary instead)
# ---- outputs
OUTPUT_CSV = "interpretations.csv"  # one row per selected feature
REPORT_HTML = "report.html"  # self-contained report (plots inline, no network needed)
SWEEP_CSV = None  # a sweep's table (run_pipeline.py sets it): shown in the report as the cells this SAE was chosen from
# -----------------------------------------------------------------------------
config = configure(globals(), also={"SELECT_BY": (list,)})
# -----------------------------------------------------------------------------
# ---- inputs and their consistency
for name, output in (("OUTPUT_CSV", OUTPUT_CSV), ("REPORT_HTML", REPORT_HTML)):  # before any work
    if problem := unwritable(os.path.dirname(os.path.abspath(output))):
        fail(f"{name}={output} cannot be written there ({problem}); choose a writable folder")
try:
    lock_output(OUTPUT_CSV)  # one interpretation writing these outputs at a time
except Busy as e:
    fail(str(e))
device = runtime.pick_device(DEVICE)
ckpt_path = SAE_CHECKPOINT or checkpoint_path(RUN_NAME, M, K)
try:
    sae, ckpt = load_checkpoint(ckpt_path, device)
    acts = open_activations(ACTIVATIONS_PATH, verify=True)
except (CheckpointError, ActivationFileError) as e:
    fail(str(e))
if sae.d_in != acts.d:
    fail(f"{ckpt_path} was trained on {sae.d_in}-wide activations but {ACTIVATIONS_PATH} is {acts.d}-wide; "
         f"use the activations it was trained on (provenance: {ckpt['provenance'].get('activations_path')})")
if not os.path.isfile(DATASET_PATH):
    fail(f"dataset {DATASET_PATH} does not exist; set DATASET_PATH to the file the activations came from")
try:
    sweep_rows = sweep.read_csv(SWEEP_CSV) if SWEEP_CSV else []
except (OSError, ValueError, KeyError) as e:
    fail(f"SWEEP_CSV={SWEEP_CSV} cannot be read ({e}); rerun run_pipeline.py, which writes it, or set it to None")
dataset_sha = sha256_file(DATASET_PATH)
if acts.meta.get("dataset_sha256") != dataset_sha:
    fail(f"{DATASET_PATH} is not the dataset {ACTIVATIONS_PATH} was extracted from (sha256 differs; it came "
         f"from {acts.meta.get('dataset_path')}); set DATASET_PATH to that file or re-extract")
n_lines = count_examples(DATASET_PATH)
if n_lines != acts.n_examples:
    fail(f"{DATASET_PATH} has {n_lines} examples but {ACTIVATIONS_PATH} has {acts.n_examples}; they do not "
         f"belong together, re-extract")
if "resume" in ckpt:
    print(f"Note: {ckpt_path} is an unfinished run (training stopped after epoch {ckpt.get('epoch')}); its weights "
          f"are the best epoch so far. Rerun train_sae.py with --resume=True to finish it")
elif os.path.exists(unfinished_path(ckpt_path)):
    print(f"Note: an unfinished later run of these settings is in {unfinished_path(ckpt_path)}; this uses the "
          f"finished {ckpt_path}")
selection = ckpt["provenance"].get("train_tokens", "no_first")
print(f"SAE: {ckpt_path} (M={sae.m}, K={sae.k}, trained on {selection} tokens of {acts.meta['model']} "
      f"layer {acts.meta['layer']})")
print(f"Activations: {ACTIVATIONS_PATH} ({acts.n_examples} examples, {acts.n_tokens} tokens)")
if isinstance(SELECT_BY, list):
    bad = [i for i in SELECT_BY if not isinstance(i, int) or not 0 <= i < sae.m]
    if bad:
        fail(f"SELECT_BY lists features {bad} that do not exist; indices must be in 0..{sae.m - 1}")
elif SELECT_BY not in ("auto", "prevalence", "label_auroc"):
    fail(f"SELECT_BY={SELECT_BY!r} must be 'auto', 'prevalence', 'label_auroc' or a list of feature indices")
if SELECT_BY == "label_auroc" and acts.labels is None:
    fail(f"SELECT_BY='label_auroc' needs labels, but {ACTIVATIONS_PATH} has none; use 'prevalence'")
for name, value, low in (("N_TOP_NEURONS", N_TOP_NEURONS, 1), ("N_EXAMPLES", N_EXAMPLES, 1), ("CONTEXT_TOKENS", CONTEXT_TOKENS, 0),
                         ("N_SCORE_EXAMPLES", N_SCORE_EXAMPLES, 0), ("MAX_RETRIES", MAX_RETRIES, 0),
                         ("RETRY_BASE_S", RETRY_BASE_S, 0), ("N_WORKERS", N_WORKERS, 1)):
    if value < low:
        fail(f"{name}={value} must be at least {low}")
if TIMEOUT_S <= 0:
    fail(f"TIMEOUT_S={TIMEOUT_S} must be positive (seconds per request)")
if INTERPRET_TOKENS not in ("content", "trained"):
    fail(f"INTERPRET_TOKENS={INTERPRET_TOKENS!r} must be 'content' or 'trained'")
if not 0 < TEMPLATE_SHARE <= 1:
    fail(f"TEMPLATE_SHARE={TEMPLATE_SHARE} must be in (0, 1], e.g. 0.5")

# ---- feature activations per example (streamed through the SAE in chunks)
t0 = time.time()
try:
    ex = example_features(sae, acts, TokenSelection(acts, selection), INTERPRET_TOKENS, device, progress=not QUIET)
except NonFiniteActivations as e:
    fail(str(e))
max_NM, peak_NM = ex.max_NM, ex.peak_NM
active_NM = max_NM > 0
prevalence = active_NM.mean(0)
mean_activation = np.where(active_NM.any(0), max_NM.sum(0) / np.maximum(active_NM.sum(0), 1), 0.0)
is_template = template_features(ex, TEMPLATE_SHARE)
template_share = ex.template_share_M
labels = acts.labels
auroc_LM, label_names = (auroc(max_NM, labels) if labels is not None else (None, []))
covered = labels_covered(auroc_LM, label_names) if labels is not None else []
print(f"Feature activations per example ({INTERPRET_TOKENS} tokens) computed in {time.time() - t0:.1f}s; "
      f"{int((prevalence == 0).sum())} of {sae.m} features never fire there; {int(is_template.sum())} are template "
      f"features (at least {TEMPLATE_SHARE:.0%} of their activation on template or shared-prefix positions)")
if labels is not None:
    print(f"Labels: {len(covered)} of {len(label_names)} are some feature's own best label at AUROC >= 0.8")

if isinstance(SELECT_BY, list):
    selected, selected_by = list(dict.fromkeys(SELECT_BY)), "by index"
else:
    by_label = SELECT_BY == "label_auroc" or (SELECT_BY == "auto" and labels is not None)
    selected = default_selection(N_TOP_NEURONS, prevalence, mean_activation, is_template,
                                 auroc_LM if by_label else None)
    selected_by = "content features by label association" if by_label else "content features by prevalence"

# ---- examples per feature: top activating (shown), held-out activating and non-activating (scoring)
try:
    tokenizer = lm.load_tokenizer(lm.resolve_from_meta(acts.meta))  # to show tokens as text
except lm.ModelNotFound as e:
    fail(f"the tokenizer of {acts.meta['model']} is needed to show examples: {e}")
token_counts = Counter(np.asarray(acts.token_ids).tolist())
rng = np.random.default_rng(SEED)


best_label_M, best_auroc_M = best_labels(auroc_LM) if auroc_LM is not None else (None, None)
features = {}
for f in selected:
    order = np.argsort(-max_NM[:, f], kind="stable")
    firing = order[max_NM[order, f] > 0]
    silent = rng.permutation(np.flatnonzero(~active_NM[:, f]))
    n_held = len(firing[N_EXAMPLES:N_EXAMPLES + N_SCORE_EXAMPLES])  # as many silent ones held out as firing ones
    marked = [mark_peak(tokenizer, *acts.tokens(i), int(peak_NM[i, f]), CONTEXT_TOKENS)
              for i in firing[:N_EXAMPLES + n_held]]
    plain = [content_text(tokenizer, *acts.tokens(i), 4 * CONTEXT_TOKENS) for i in silent[:N_EXAMPLES + n_held]]
    peak_ids = np.asarray(acts.token_ids[acts.offsets[firing] + peak_NM[firing, f]])
    best_label = best_auroc = None
    if auroc_LM is not None and best_label_M[f] >= 0:
        best_label, best_auroc = label_names[best_label_M[f]], float(best_auroc_M[f])
    top_tokens = distinctive_tokens(peak_ids, token_counts, acts.n_tokens, tokenizer)
    features[f] = Feature(
        index=int(f), template=bool(is_template[f]), prevalence=float(prevalence[f]),
        mean_activation=float(mean_activation[f]),
        template_share=None if np.isnan(template_share[f]) else float(template_share[f]), top_tokens=top_tokens,
        top_label=best_label, top_label_auroc=best_auroc,
        description=data_description(best_label, best_auroc, top_tokens, marked[0] if marked else None),
        shown=marked[:N_EXAMPLES], held_out=marked[N_EXAMPLES:], shown_silent=plain[:N_EXAMPLES],
        held_silent=plain[N_EXAMPLES:])


# ---- LLM descriptions and scores
api_key = os.environ.get("OPENAI_API_KEY")
base_url = OPENAI_BASE_URL or os.environ.get("OPENAI_BASE_URL")
out_dir = os.path.dirname(os.path.abspath(OUTPUT_CSV))
os.makedirs(out_dir, exist_ok=True)
chat, unreachable = None, False
if api_key or base_url:
    chat = CachedChat(os.path.join(out_dir, "llm_cache.jsonl"), base_url, api_key, TIMEOUT_S, MAX_RETRIES,
                      RETRY_BASE_S)
    print(f"LLM: {OPENAI_MODEL} describes, {ANNOTATOR_MODEL} scores, at {chat.url}")
    try:  # descriptions of the selected features, then their scores on held-out examples
        describe = lambda f: chat.ask(OPENAI_MODEL, describe_prompt(features[f], TASK_HINT), temperature=0.0,  # noqa: E731
                                      max_tokens=60)
        if selected:  # the first request alone: a refused key stops here, not after N_WORKERS requests
            describe(selected[0])
        with ThreadPoolExecutor(N_WORKERS) as pool:
            answers = dict(zip(selected, tqdm(pool.map(describe, selected), total=len(selected), leave=False,
                                              desc="LLM descriptions", disable=QUIET or None)))  # the first: cached
            for f, answer in answers.items():
                if answer:
                    features[f].description, features[f].source = answer, Source.LLM
                else:  # the data's description stays, and says so
                    features[f].source = Source.DATA_NO_ANSWER
            if SCORE:
                annotate = lambda messages: chat.ask(ANNOTATOR_MODEL, messages, temperature=0.0, max_tokens=2)  # noqa: E731
                score_descriptions(features, answers, annotate, lambda fn, jobs: tqdm(
                    pool.map(fn, jobs), total=len(jobs), desc="LLM scoring", leave=False, disable=QUIET or None))
    except AuthenticationFailed as e:
        fail(str(e))
    unreachable = chat.unreachable
    print(chat.summary())
else:
    print("No OPENAI_API_KEY and no OPENAI_BASE_URL: each feature is described from the data (its best label, "
          "peak tokens and a top example); set either and rerun for LLM descriptions")

# ---- console
for f in selected:
    print("\n" + features[f].console())

# ---- outputs (each written to a temporary name, then renamed)
rows = [features[f].csv_row() for f in selected]


cards = [features[f].card() for f in selected]
template_rows = [{"neuron_idx": int(f), "peak_token": token_text(tokenizer, ex.peak_token_M[f]), "share": float(template_share[f])}
                 for f in np.flatnonzero(is_template)[np.argsort(-template_share[is_template], kind="stable")]]
n_described = sum(1 for f in selected if features[f].source is Source.LLM)
llm_note = chat.summary() if chat else ("Descriptions come from the data (best label, peak tokens, a top example); "
                                        "set OPENAI_API_KEY or OPENAI_BASE_URL for LLM descriptions.")
metrics = dict(ckpt.get("metrics", {}))
label_note = (f"{len(covered)} of {len(label_names)} labels are some feature's own best label at AUROC ≥ 0.8 "
              f"(per-example maxima over {INTERPRET_TOKENS} tokens)" if labels is not None else None)
html = render_report(f"SAE features: {acts.meta['model']} layer {acts.meta['layer']}, M={sae.m}, K={sae.k}",
              {"interpret": redacted(config), "train": ckpt.get("config"), "provenance": ckpt.get("provenance")},
              metrics, ckpt.get("history", []), prevalence, auroc_LM, label_names, cards, llm_note,
              template_rows=template_rows, label_note=label_note, sweep_rows=sweep_rows)
record = make_record("interpret", config, interpretation_inputs(ckpt_path, DATASET_PATH, chat is not None, SWEEP_CSV),
                     complete=chat is None or n_described == len(selected))  # complete: every feature described
record_path = interpretation_record_path(REPORT_HTML)
table_heading = (f"Selected features ({len(selected)} of {sae.m}, {selected_by}; share of examples active; "
                 f"description from {'the LLM' if n_described else 'the data'}):")
try:  # all outputs, or none: an old report never sits beside a new CSV
    write_all_atomic({OUTPUT_CSV: lambda tmp: pd.DataFrame(rows, columns=CSV_COLUMNS).to_csv(tmp, index=False),
                      REPORT_HTML: text_writer(html),
                      record_path: text_writer(json.dumps({"record": record, "n_selected": len(selected),
                                                           "n_described": n_described, "table_heading": table_heading},
                                                          indent=2))})
except OSError as e:
    if e.errno not in NO_SPACE:
        raise
    fail(f"no space left while writing {OUTPUT_CSV} and {REPORT_HTML} ({e.strerror}); the previous outputs are "
         f"unchanged, free some space and rerun (LLM answers are cached)")
print(f"\nSaved {OUTPUT_CSV} ({len(rows)} features, {n_described} described by an LLM) and {REPORT_HTML}; "
      f"{len(template_rows)} template features are listed apart in the report")

# ---- the selected features at a glance
if FEATURE_TABLE:
    print(f"\n{table_heading}")
    print("\n".join(feature_table((f, prevalence[f], features[f].description) for f in selected)))
if unreachable:
    fail(f"could not reach the LLM server at {chat.url} after {MAX_RETRIES} retries; the outputs without "
         f"LLM descriptions were written ({OUTPUT_CSV}, {REPORT_HTML}); check OPENAI_BASE_URL and rerun")
