"""Train a TopK sparse autoencoder (Matryoshka and BatchTopK variants) on extracted activations.

Train and validation are split by example (stratified by label), never by token. Batches stream from
the memory-mapped activations file through a shuffling buffer; the whole file is never loaded. The
best model by validation loss is saved to checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt after every
epoch (atomically), with everything needed to resume, rebuild and trace it.

    python train_sae.py                                   # after the default extraction: M=256, K=8, CPU
    python train_sae.py --m=512 --k=16 --use_batch_topk=True
    python train_sae.py --activations_path=activations/activations_layer16.npz --device=cuda --bf16=True
    python train_sae.py --resume=True                     # continue an interrupted run
    python train_sae.py --help                            # every setting with its meaning
"""
import gc
import json
import math
import os
import time

from sae.config import answer_help

answer_help(__doc__, __file__)  # -h/--help answers here, before torch and transformers load

import numpy as np
import torch
from tqdm import tqdm

from sae import dist, lm, lm_eval, runtime
from sae.activations import ActivationFileError, open_activations
from sae.checkpoint import FORMAT, save_checkpoint
from sae.config import configure, fail
from sae.data import sha256_file
from sae.metrics import reconstruction_metrics
from sae.provenance import differences, make_record
from sae.model import SparseAutoencoder, check_config, default_prefixes
from sae.files import NO_SPACE, Busy, checkpoint_path, lock_output, unfinished_path, unwritable, write_text_atomic
from sae.features import example_features, label_metrics
from sae.selection import TOKEN_SELECTIONS, TokenSelection
from sae.step import pick_step
from sae.stream import MixingStream, NonFiniteActivations, count_tokens, init_sample, split_examples

# ---- data
ACTIVATIONS_PATH = "activations/activations_layer12.npz"  # written by extract_activations.py
TRAIN_TOKENS = "distinct"  # "distinct" (no attention sinks; positions shared by several examples once), "no_first", "all", "no_special", "assistant", "content"
SHARED_COPIES = 16  # with "distinct": copies kept of each position that several examples share (1 = once)
VAL_FRACTION = 0.1  # share of examples (not tokens) held out for validation, stratified by label
# ---- model
M = 256  # number of features (dictionary size)
K = 8  # active features per token
USE_MATRYOSHKA = False  # average the loss over nested prefixes of the features (Bussmann et al. 2025)
MATRYOSHKA_PREFIXES = None  # increasing, ending at M; None = [M // 4, M]
USE_BATCH_TOPK = False  # keep the top K·B activations of a batch; a learned threshold at inference
AUX_K = None  # dead features used by the aux-K loss; None = 2·K
DEAD_STEPS = 256  # a feature is dead after this many training steps without firing
INPUT_NORM = "layer_norm"  # each token centred and scaled by its own mean and std before encoding, restored after decoding (SAELens' layer_norm); or "none"
# ---- training
N_EPOCHS = 100  # upper bound; early stopping usually ends sooner
BATCH_SIZE = 512  # tokens per step
LR = 5e-4  # Adam learning rate (HypotheSAEs' default)
GRAD_CLIP = 1.0  # max gradient norm
PATIENCE = 5  # epochs without a better validation loss before stopping
SEED = 0  # split, initialisation and data order
DEVICE = "auto"  # "auto" (CUDA when present), "cpu", "cuda"
BF16 = False  # bfloat16 autocast on CUDA
# ---- output
RUN_NAME = "cognitive_actions"  # checkpoints/{RUN_NAME}/SAE_M={M}_K={K}.pt
RESUME = False  # continue from that checkpoint's last epoch
QUIET = False  # no progress bars and no per-epoch lines: for scripts and logs
EXPORT_SAELENS = True  # also write cfg.json + sae_weights.safetensors for SAELens (TopK; BatchTopK as JumpReLU)
# ---- evaluation with the model in the loop
EVAL_LM = True  # next-token loss with the layer's output replaced by the SAE's reconstruction, on validation examples
EVAL_MAX_EXAMPLES = 30  # validation examples used for it (each runs the whole model once, and 3 times from the layer on)
EVAL_BATCH_TOKENS = 2048  # token budget of one padded batch there (logits are batch × vocabulary)
# -----------------------------------------------------------------------------
config = configure(globals(), also={"MATRYOSHKA_PREFIXES": (list,), "AUX_K": (int,)})
# -----------------------------------------------------------------------------

# ---- settings check
if TRAIN_TOKENS not in TOKEN_SELECTIONS:
    fail(f"TRAIN_TOKENS={TRAIN_TOKENS!r} is not one of {', '.join(TOKEN_SELECTIONS)}")
if MATRYOSHKA_PREFIXES is not None and not USE_MATRYOSHKA:
    fail(f"MATRYOSHKA_PREFIXES={MATRYOSHKA_PREFIXES} is set but USE_MATRYOSHKA=False, so they would be ignored; "
         f"add --use_matryoshka=True or leave MATRYOSHKA_PREFIXES at None")
prefixes = (MATRYOSHKA_PREFIXES or default_prefixes(M)) if USE_MATRYOSHKA else None
aux_k = 2 * K if AUX_K is None else AUX_K
for name, value, low in (("N_EPOCHS", N_EPOCHS, 1), ("BATCH_SIZE", BATCH_SIZE, 1), ("PATIENCE", PATIENCE, 1),
                         ("DEAD_STEPS", DEAD_STEPS, 1), ("SHARED_COPIES", SHARED_COPIES, 1),
                         ("EVAL_MAX_EXAMPLES", EVAL_MAX_EXAMPLES, 1), ("EVAL_BATCH_TOKENS", EVAL_BATCH_TOKENS, 1)):
    if value < low:
        fail(f"{name}={value} must be at least {low}")
for name, value in (("LR", LR), ("GRAD_CLIP", GRAD_CLIP)):
    if not value > 0:
        fail(f"{name}={value} must be positive (e.g. --lr=5e-4, --grad_clip=1.0)")
if not 0 < VAL_FRACTION < 1:
    fail(f"VAL_FRACTION={VAL_FRACTION} must be between 0 and 1 (e.g. 0.1)")
if QUIET:
    runtime.quiet_libraries()
device = runtime.pick_device(DEVICE)
if device.type == "cuda" and not torch.cuda.is_available():
    fail(f"DEVICE={DEVICE} but CUDA is not available here; use --device=cpu or --device=auto")
device = dist.setup(device)  # under torchrun: this process's GPU, the process group, and quiet ranks > 0
rank, world = dist.rank(), dist.world()
runtime.keep_training_memory_bounded()

# ---- data
try:
    acts = open_activations(ACTIVATIONS_PATH, verify=True)
except ActivationFileError as e:
    fail(str(e))
problem = check_config(acts.d, M, K, prefixes, aux_k, INPUT_NORM)
if problem:
    fail(problem)
train_ids, val_ids = split_examples(acts.n_examples, acts.labels, VAL_FRACTION, SEED)
if len(val_ids) == 0 or len(train_ids) == 0:
    fail(f"{ACTIVATIONS_PATH} has {acts.n_examples} examples, too few for a validation split with "
         f"VAL_FRACTION={VAL_FRACTION}; use more examples or a larger --val_fraction")
selection = TokenSelection(acts, TRAIN_TOKENS, [train_ids, val_ids], SHARED_COPIES)  # per split
n_train, n_train_left = count_tokens(acts, train_ids, selection)
n_val, n_val_left = count_tokens(acts, val_ids, selection)
if n_train == 0 or n_val == 0:
    fail(f"TRAIN_TOKENS={TRAIN_TOKENS!r} selects no tokens in {'training' if n_train == 0 else 'validation'} "
         f"examples of {ACTIVATIONS_PATH} (is there an assistant turn?); choose another selection")
print(f"Activations: {ACTIVATIONS_PATH} ({acts.meta['model']}, layer {acts.meta['layer']}, d={acts.d}, "
      f"{acts.n_examples} examples, {acts.n_tokens} tokens)")
print(f"Train: {len(train_ids)} examples, {n_train} tokens; Val: {len(val_ids)} examples, {n_val} tokens "
      f"(split by example; tokens: {TRAIN_TOKENS} = {selection.description}, "
      f"{n_train_left + n_val_left} left out)")

stream = MixingStream(acts, train_ids, selection, BATCH_SIZE, SEED, rank=rank, world=world)
path = checkpoint_path(RUN_NAME, M, K)
if rank == 0 and (problem := unwritable(os.path.dirname(path))):
    fail(f"the checkpoint folder {os.path.dirname(path)} is not writable ({problem}); run from a folder where "
         f"checkpoints/ can be written or change RUN_NAME")
try:
    if rank == 0:  # the only writer: one training of a checkpoint at a time
        lock_output(path)
except Busy as e:
    fail(str(e))
record = make_record("train", config, {"activations": sha256_file(ACTIVATIONS_PATH)}, world)
provenance = {"activations_path": os.path.abspath(ACTIVATIONS_PATH), "activations_bytes": os.path.getsize(ACTIVATIONS_PATH),
              "model": acts.meta["model"],
              "layer": acts.meta["layer"], "hook": acts.meta.get("hook"), "train_tokens": TRAIN_TOKENS,
              "dataset_path": acts.meta.get("dataset_path"), "dataset_sha256": acts.meta.get("dataset_sha256"),
              "n_train_examples": len(train_ids), "n_val_examples": len(val_ids),
              "n_train_tokens": n_train, "n_val_tokens": n_val, "processes": world}

# ---- model, optimizer, and the state to resume from
torch.manual_seed(SEED)
sae = SparseAutoencoder(acts.d, M, K, aux_k=aux_k, dead_steps=DEAD_STEPS, prefixes=prefixes,
                        batch_topk=USE_BATCH_TOPK, input_norm=INPUT_NORM)
sample = init_sample(acts, train_ids, selection, SEED)
sae.init_from_data(sample)
mean_activation_D = sample.mean(0)  # for the mean-ablation baseline of the LM evaluation
sae.to(device)
optimizer = torch.optim.Adam(sae.parameters(), lr=LR, fused=device.type in ("cpu", "cuda"))
step, no_c_step = pick_step(device)  # on a CPU the C step (sae/sae_step.c) where it can be built
start_epoch, best_loss, best_state, bad_epochs, history = 0, math.inf, None, 0, []
if RESUME:
    try:
        resume_from = unfinished_path(path) if os.path.exists(unfinished_path(path)) else path
        ckpt = torch.load(resume_from, map_location=device, weights_only=True)
    except FileNotFoundError:
        fail(f"RESUME=True but {path} does not exist; drop --resume or check RUN_NAME, M and K")
    except Exception as e:
        fail(f"RESUME=True but {path} could not be read ({type(e).__name__}); delete it and train from scratch")
    mismatch = differences(ckpt.get("record"), record, continuing=True)
    if ckpt.get("format") != FORMAT or ckpt["sae_config"] != sae.config or mismatch:
        fail(f"cannot resume from {path}: it was trained with other settings or data (differs: "
             f"{', '.join(mismatch) or 'sizes'}); use the same settings or drop --resume")
    if "resume" not in ckpt:
        print(f"{path} is a finished run (it stopped at epoch {ckpt['epoch']}); nothing to resume")
        raise SystemExit(0)
    r = ckpt["resume"]
    sae.load_state_dict(r["state_dict"])
    optimizer.load_state_dict(r["optimizer"])
    start_epoch, best_loss, bad_epochs, history = r["epoch"], r["best_loss"], r["bad_epochs"], ckpt["history"]
    best_state = ckpt["state_dict"]
    print(f"Resuming {path} after epoch {start_epoch}")


def fail_if_full(error: OSError, path: str):
    """One sentence and exit 2 when a write failed for want of space; other errors are left to the caller."""
    if error.errno in NO_SPACE:
        fail(f"no space left while saving {path} ({error.strerror}); free some space and rerun (with "
             f"--resume=True while training was unfinished): every file written so far is complete")


# ---- training
print(f"SAE: M={M}, K={K}, {'BatchTopK' if USE_BATCH_TOPK else 'TopK'}, Matryoshka prefixes {prefixes}, "
      f"aux_k={aux_k}, input norm {INPUT_NORM}, input scale {sae.scale.item():.4g}, {device}, {step.name} training step")
if no_c_step:
    print(f"Note: {no_c_step}; training uses the PyTorch step (same results, about half the speed on a CPU)")
steps_per_epoch = math.ceil(n_train / BATCH_SIZE)
if world > 1:  # data parallel: gradients, dead-feature counters and BatchTopK thresholds are combined below
    print(f"Data parallel over {world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}): effective batch "
          f"{BATCH_SIZE * world} tokens per step (BATCH_SIZE={BATCH_SIZE} per process), LR {LR}")
run_record = {"format": FORMAT, "config": config, "sae_config": sae.config, "provenance": provenance, "record": record}
chunk_tokens = runtime.eval_chunk_tokens(device, acts.d)
gc.freeze()  # what exists now (modules, data, model) is never garbage: collections during training skip it
t_start, tokens_seen, loop_seconds = time.time(), 0, 0.0  # loop: the steps alone, without validation
autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=BF16 and device.type == "cuda")
try:
    for epoch in range(start_epoch, N_EPOCHS):
        sae.train()
        loss_sum, n_steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        batches = stream.epoch(epoch, for_gpu=device.type == "cuda")
        t_loop = time.time()
        if world > 1:  # every process must take the same number of steps
            steps = int(-dist.all_reduce([-(stream.n_tokens(epoch) // BATCH_SIZE)], "max")[0])
            batches = (x for _, x in zip(range(steps), batches))
        for x in tqdm(batches, total=steps_per_epoch // world, desc=f"epoch {epoch + 1}", leave=False,
                      disable=rank > 0 or QUIET or None):
            x = x.to(device, non_blocking=True).float()  # a GPU's batches come as stored
            out = step(sae, x, sae.dead_mask(), backward=True, autocast=autocast)
            grad_norm = out.grad_norm  # decoder gradients are already tangent to the unit-norm rows
            if world > 1:
                for p in sae.parameters():
                    dist.average_(p.grad)
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in sae.parameters()])
            step.update(sae, optimizer, GRAD_CLIP, grad_norm)
            sae.update_dead(out.fired, dist.any_process if world > 1 else None)
            if USE_BATCH_TOPK and world > 1:
                dist.average_(sae.threshold)
            loss_sum += out.loss
            n_steps += 1
            tokens_seen += len(x) * world
        runtime.synchronize(device)
        loop_seconds += time.time() - t_loop
        val = reconstruction_metrics(sae, acts, val_ids, selection, step, device, chunk_tokens)
        val_loss = float(np.mean([math.nan if v is None else v for v in val["prefix_nmse"]]))
        dead_ratio = sae.dead_mask().float().mean().item()
        loss_sum, n_steps = dist.all_reduce([loss_sum.item(), n_steps])
        train_loss = float(loss_sum / max(n_steps, 1))
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            advice = f"lower --lr (now {LR}) or --grad_clip (now {GRAD_CLIP})"
            if best_state is None:
                fail(f"training diverged in epoch {epoch + 1} (train loss {train_loss}, validation loss {val_loss}) "
                     f"before any usable epoch; {advice}; nothing was saved")
            print(f"Training diverged in epoch {epoch + 1} (train loss {train_loss}, validation loss {val_loss}); "
                  f"keeping the best epoch so far (validation loss {best_loss:.4f}); {advice}")
            break
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                        "val_nmse": val["nmse"], "dead_ratio": dead_ratio, "l0": val["l0"]})
        improved = val_loss < best_loss
        if improved:
            best_loss, bad_epochs = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
        else:
            bad_epochs += 1
        if not QUIET:
            print(f"Epoch {epoch + 1}/{N_EPOCHS}: train_loss={train_loss:.4f} val_loss={val_loss:.4f} "
                  f"dead_ratio={dead_ratio:.3f}{' *' if improved else ''}", flush=True)
        stop = bad_epochs >= PATIENCE
        if rank == 0:  # the only writer; every process holds the same weights
            save_checkpoint(path, {**run_record, "state_dict": best_state, "history": history, "epoch": epoch + 1},
                            resume={"state_dict": sae.state_dict(), "optimizer": optimizer.state_dict(),
                                    "epoch": epoch + 1, "best_loss": best_loss, "bad_epochs": bad_epochs})
        if stop:
            print(f"Early stopping: no better validation loss for {PATIENCE} epochs")
            break
except NonFiniteActivations as e:
    fail(str(e))
except OSError as e:
    fail_if_full(e, path)
    raise
elapsed = time.time() - t_start
if world > 1:  # the rest (final metrics, LM evaluation, files) is rank 0's
    # every process must hold the same model (gradients, BatchTopK thresholds and dead-feature counters are
    # combined at each step): compare a sum of each tensor across processes before only rank 0 goes on
    differ = dist.differs_across_processes([float(t.double().sum()) for t in sae.state_dict().values()])
    if differ:
        fail(f"the {world} processes ended training with different {', '.join(list(sae.state_dict())[i] for i in differ)}; "
             f"this is a bug in combining their steps, please report it (one process gives a usable model: "
             f"rerun without torchrun)")
    print(f"All {world} processes hold the same weights, threshold and dead-feature counters")
    dist.barrier()
    dist.finish()  # ranks > 0 end here

# ---- final metrics of the best model
sae.load_state_dict(best_state)
sae.eval()  # from here on inference: BatchTopK's threshold, which is no longer moved
final = reconstruction_metrics(sae, acts, val_ids, selection, step, device, chunk_tokens, full=True)
left = final.pop("left_out")
metrics = {"val_mse": final["mse"], "val_nmse": final["nmse"], "val_prefix_nmse": final["prefix_nmse"],
           "l0": final["l0"], "dead_ratio": sae.dead_mask().float().mean().item(),
           "never_fired_ratio": final["never_fired_ratio"], "left_out": left, "best_val_loss": best_loss,
           "epochs": len(history), "train_tokens_per_s": tokens_seen / max(elapsed, 1e-9),
           "train_loop_tokens_per_s": tokens_seen / max(loop_seconds, 1e-9),
           "train_seconds": elapsed, "val_nmse_content": final["content"].get("nmse"), "content": final["content"],
           "by_token_kind": final["by_token_kind"], "peak_gpu_memory_bytes": runtime.peak_gpu_memory(device)}
content_nmse = metrics["val_nmse_content"]
print(f"Val MSE: {final['mse']:.6g} (normalized: {final['nmse']:.4f}; on content tokens: "
      f"{'n/a' if content_nmse is None else f'{content_nmse:.4f}'})")
print(f"Active features/token: {final['l0']:.2f}")
print(f"Dead neurons: {100 * metrics['dead_ratio']:.1f}% (no firing in the last {DEAD_STEPS} steps); "
      f"{100 * final['never_fired_ratio']:.1f}% never fire on validation")
if len(prefixes or []) > 1:
    print("Matryoshka prefixes: " + ", ".join(f"first {p}: normalized MSE {v:.4f}"
                                             for p, v in zip(prefixes, final["prefix_nmse"])))
if left.get("tokens"):
    print(f"Left-out tokens ({TRAIN_TOKENS}): {left['tokens']} tokens, MSE {left['mse']:.6g} "
          f"(relative error ‖x − x̂‖²/‖x‖²: {left['relative_error']:.4f}), not trained on")
print(f"Throughput: {metrics['train_tokens_per_s']:.0f} tokens/s ({tokens_seen} tokens in {elapsed:.1f}s; "
      f"{metrics['train_loop_tokens_per_s']:.0f} tokens/s in the steps alone, without validation)")
print("Reconstruction by token kind (validation tokens; a position shared by several examples counted once):")
for name, r in final["by_token_kind"].items():
    if r.get("tokens"):
        nmse = "n/a (all alike)" if r["nmse"] is None else f"{r['nmse']:.4f}"
        print(f"  {name:<9} {r['tokens']:>8} tokens  MSE {r['mse']:<10.5g} normalized {nmse:<8} "
              f"relative {r['relative_error']:<8.4f} L0 {r['l0']:.2f}")

if acts.labels is not None:
    t0 = time.time()
    ex = example_features(sae, acts, TokenSelection(acts, TRAIN_TOKENS), "content", device)  # content maxima and means
    metrics["labels"] = lab = label_metrics(ex, acts.labels, train_ids, val_ids)
    print(f"Labels: {lab['labels_covered']} of {lab['n_labels']} are some feature's own best label at AUROC >= "
          f"{lab['auroc_threshold']} (mean best AUROC per feature {lab['mean_best_auroc']:.3f}); linear probe on "
          f"{lab['probe_val_examples']} validation examples: SAE feature maxima {100 * lab['probe_sae_accuracy']:.1f}%, "
          f"SAE feature means {100 * lab['probe_sae_mean_accuracy']:.1f}%, "
          f"mean-pooled activations {100 * lab['probe_raw_accuracy']:.1f}% (majority label "
          f"{100 * lab['probe_chance']:.1f}%), {time.time() - t0:.1f}s")

# ---- the SAE in the model: next-token loss with the layer's output replaced by the reconstruction
if EVAL_LM:
    try:
        location = lm.resolve_from_meta(acts.meta)
    except lm.ModelNotFound as e:
        location = None
        metrics["lm_eval"] = {"skipped": str(e)}
        print(f"LM evaluation skipped: {e}")
    if location is not None:
        model_dtype = runtime.pick_dtype(acts.meta.get("dtype_setting", "auto"), device)
        language_model = lm.load_model(location, device, model_dtype)
        chosen = np.sort(np.random.default_rng(SEED).permutation(val_ids)[:EVAL_MAX_EXAMPLES])
        examples = [(np.asarray(acts.token_ids[acts.offsets[i]:acts.offsets[i + 1]]),
                     selection.example_mask(acts, i)) for i in chosen]
        t0 = time.time()
        lm_metrics = lm_eval.evaluate_lm(language_model, examples, acts.meta["layer"], lambda h: sae(h), mean_activation_D,
                                    EVAL_BATCH_TOKENS, progress=not QUIET)
        lm_metrics["replaced"] = (f"the tokens TRAIN_TOKENS={TRAIN_TOKENS!r} selects within each example on its own "
                                  f"(for 'distinct': all but the first); others keep the model's output")
        metrics["lm_eval"] = lm_metrics
        del language_model
        print(f"LM evaluation on {len(examples)} validation examples ({lm_metrics['predictions']} next-token "
              f"predictions, {time.time() - t0:.1f}s): layer {acts.meta['layer']} output replaced at "
              f"{lm_metrics['replaced_positions']} positions, {lm_metrics['replaced']}")
        print(f"  CE clean {lm_metrics['ce_clean']:.4f}, with SAE {lm_metrics['ce_sae']:.4f}, zero-ablated "
              f"{lm_metrics['ce_zero']:.4f}, mean-ablated {lm_metrics['ce_mean']:.4f}")
        print(f"  ΔLM loss {lm_metrics['delta_lm_loss_pct']:+.2f}%; loss recovered "
              f"{100 * lm_metrics['frac_recovered_zero']:.1f}% (vs zero), {100 * lm_metrics['frac_recovered_mean']:.1f}% "
              f"(vs mean); KL(clean ‖ SAE) {lm_metrics['kl_sae']:.4f} nats/token")

try:
    save_checkpoint(path, {**run_record, "state_dict": best_state, "history": history, "epoch": len(history),
                           "metrics": metrics})
    metrics_path = os.path.join(os.path.dirname(path), "metrics.json")
    write_text_atomic(metrics_path, json.dumps({"checkpoint": path, **metrics, "history": history}, indent=2))
    print(f"Saved {path} and {metrics_path}")
    if EXPORT_SAELENS:
        from sae.saelens import export_saelens
        folder = export_saelens(sae, os.path.join(os.path.dirname(path), f"saelens_M={M}_K={K}"), acts.meta)
        print(f"SAELens export: {folder}")
except OSError as e:
    fail_if_full(e, path)
    raise

dist.leave()  # under torchrun: exit without the interpreter teardown that can abort (see sae/dist.py)
