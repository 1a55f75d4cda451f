"""The SAE in the model: next-token loss with a decoder block's output replaced by the SAE's
reconstruction (or by zeros, or by the mean), beside the clean model."""
import numpy as np
import torch
from tqdm import tqdm

from .forward import length_batches, pad_right
from .lm import decoder_blocks


@torch.no_grad()
def next_token_loss(model, input_ids, attention_mask, layer: int, replace=None, replace_mask=None, clean_logp=None):
    """Summed next-token cross-entropy, number of predictions, summed KL(clean ‖ this run) when
    `clean_logp` is given, and this run's log-probabilities. With `replace`, the output of decoder block
    `layer` at the positions in `replace_mask` (B, T) is replaced by replace(h_ND) before the rest of the
    model runs. The whole model runs: the loss needs every block and the LM head."""
    handle = None
    if replace is not None:
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            h = h.clone()
            h[replace_mask] = replace(h[replace_mask].float()).to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h
        handle = decoder_blocks(model)[layer].register_forward_hook(hook)
    try:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    finally:
        if handle is not None:
            handle.remove()
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ce = nll[valid].sum().item()
    kl = None
    if clean_logp is not None:
        kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)[valid].sum().item()
    return ce, int(valid.sum()), kl, logp


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
    for batch in tqdm(batches, desc="LM evaluation (4 forward passes per batch)", leave=False,
                      disable=None if progress else True):  # None: shown on a terminal
        ids, mask = pad_right([examples[i][0] for i in batch])
        where, _ = pad_right([examples[i][1] for i in batch], False, torch.bool)
        ids, mask, where = ids.to(device), mask.to(device), where.to(device)
        ce, n, _, clean_logp = next_token_loss(model, ids, mask, layer)
        totals["clean"] += ce
        n_pred += n
        n_replaced += int(where.sum())
        for name, fn in ablations.items():
            ce, _, kl, _ = next_token_loss(model, ids, mask, layer, fn, where, clean_logp if name == "sae" else None)
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
