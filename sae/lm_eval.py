"""The SAE in the model: next-token loss with a decoder block's output replaced by the SAE's
reconstruction (or by zeros, or by the mean), beside the clean model. The three replaced passes start
from the clean pass's output of that block, so the blocks before it run once per batch, not four times."""
import contextlib

import numpy as np
import torch
from tqdm import tqdm

from .forward import length_batches, pad_right
from .lm import decoder_blocks


@contextlib.contextmanager
def _capturing(block, captured: dict):
    """Within: each output of `block` is kept in captured["h"] as (h, the rest of its output tuple or None)."""
    def capture(module, args, output):
        captured["h"] = (output[0], output[1:]) if isinstance(output, tuple) else (output, None)
    handle = block.register_forward_hook(capture)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _returning(blocks, block_output):
    """Within: `blocks` do no work and each returns block_output (h, rest), so the model runs on from the
    last of them. Their own `forward` (where accelerate keeps its hooks) is put back afterwards."""
    h, rest = block_output
    out = h if rest is None else (h, *rest)
    saved = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = lambda *args, **kwargs: out
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def next_token_loss(model, input_ids, attention_mask, layer: int, block_output=None, clean_logp=None):
    """Summed next-token cross-entropy over the real positions, their number, summed KL(clean ‖ this run)
    when `clean_logp` is given, this run's log-probabilities (n, V) and the output of decoder block
    `layer` as (h (B, T, D), the rest of the block's output tuple or None).

    With `block_output` (such a pair), blocks 0..layer do no work and block `layer` returns it: the rest
    of the model runs from there. A pass that changes only that block's output so costs the blocks after
    it, and gives what hooking the block in a whole pass would, since blocks 0..layer see the same input."""
    blocks, captured = decoder_blocks(model)[:layer + 1], {"h": block_output}
    with _capturing(blocks[layer], captured) if block_output is None else _returning(blocks, block_output):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    logp = torch.log_softmax(logits[:, :-1][valid].float(), dim=-1)
    ce = -logp.gather(-1, input_ids[:, 1:][valid][:, None]).sum().item()
    kl = None if clean_logp is None else (clean_logp.exp() * (clean_logp - logp)).sum().item()
    return ce, int(valid.sum()), kl, logp, captured["h"]


def replaced(block_output, where, fn):
    """The block output with h at the positions in `where` (B, T) replaced by fn(h) (computed in float32)."""
    h, rest = block_output
    h = h.clone()
    h[where] = fn(h[where].float()).to(h.dtype)
    return h, rest


def evaluate_lm(model, examples, layer: int, recon_fn, mean_D, batch_tokens: int = 2048, progress: bool = False) -> dict:
    """Cross-entropy of the clean model and with the layer's output replaced (at each example's
    `replace` positions) by recon_fn(h), by zeros and by mean_D; ΔLM loss, fraction of loss recovered
    and KL. `examples` is a list of (token_ids int array, replace mask bool array), each run on its own
    (batched with right padding, as in extraction)."""
    device = next(model.parameters()).device
    lengths = np.array([len(ids) for ids, _ in examples])
    totals = {k: 0.0 for k in ("clean", "sae", "zero", "mean", "kl")}
    n_pred = n_replaced = 0
    ablations = {"sae": recon_fn, "zero": lambda h: torch.zeros_like(h),
                 "mean": lambda h: mean_D.to(h.device, h.dtype).expand_as(h)}
    batches = length_batches(lengths, batch_tokens)
    for batch in tqdm(batches, desc="LM evaluation (a clean pass and 3 from the layer on, per batch)", leave=False,
                      disable=None if progress else True):  # None: shown on a terminal
        ids, mask = pad_right([examples[i][0] for i in batch])
        where, _ = pad_right([examples[i][1] for i in batch], False, torch.bool)
        ids, mask, where = ids.to(device), mask.to(device), where.to(device)
        ce, n, _, clean_logp, block_output = next_token_loss(model, ids, mask, layer)
        totals["clean"] += ce
        n_pred += n
        n_replaced += int(where.sum())
        for name, fn in ablations.items():
            ce, _, kl, _, _ = next_token_loss(model, ids, mask, layer, replaced(block_output, where, fn),
                                              clean_logp if name == "sae" else None)
            totals[name] += ce
            if name == "sae":
                totals["kl"] += kl
    ce = {k: totals[k] / max(n_pred, 1) for k in ("clean", "sae", "zero", "mean")}

    def recovered(ablated):
        gap = ce[ablated] - ce["clean"]
        return (ce[ablated] - ce["sae"]) / gap if gap != 0 else float("nan")

    return {"examples": len(examples), "predictions": n_pred, "replaced_positions": n_replaced,
            "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_mean": ce["mean"],
            "delta_lm_loss_pct": 100 * (ce["sae"] - ce["clean"]) / ce["clean"],
            "frac_recovered_zero": recovered("zero"), "frac_recovered_mean": recovered("mean"),
            "kl_sae": totals["kl"] / max(n_pred, 1)}
