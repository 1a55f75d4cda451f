"""The forward pass of extraction: examples batched by length with right padding, and the residual stream
read at chosen decoder blocks by a pass that stops after the deepest one, with the examples' shared
prefix (BOS and system prompt) run once."""
import inspect

import numpy as np
import torch

from .lm import decoder_blocks


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Group example indices of similar length so that (longest × count) stays within batch_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = int(lengths[order[start]])
        count = max(1, batch_tokens // max(longest, 1))
        batches.append(order[start:start + count])
        start += count
    return batches


def pad_right(arrays, fill=0, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D arrays as one (B, T) tensor padded on the right with `fill`, and the (B, T) mask of real
    entries. Right padding keeps a causal model's outputs for the real tokens unchanged."""
    width = max(len(a) for a in arrays)
    out = torch.full((len(arrays), width), fill, dtype=dtype)
    mask = torch.zeros((len(arrays), width), dtype=torch.long)
    for row, a in enumerate(arrays):
        out[row, :len(a)] = torch.tensor(a, dtype=dtype)  # a copy: `a` may be a read-only memmap slice
        mask[row, :len(a)] = 1
    return out, mask


class _StopForward(Exception):
    pass


MIN_SHARED_PREFIX = 8  # a batch whose examples all start with this many identical tokens runs them once


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Leading tokens that every row of a right-padded batch has in common (the chat template's BOS and
    system prompt), leaving each row at least one token of its own."""
    if len(input_ids) < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0).long().cumprod(0).sum()
    return int(min(same, attention_mask.sum(1).min() - 1))


def _full_attention_only(model) -> bool:
    """Whether every layer attends to the whole past (no sliding windows), so a cached prefix is exact."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(t == "full_attention" for t in types) and not getattr(config, "sliding_window", None)


def _run_blocks(model, layers: list[int], **inputs) -> dict:
    """{layer: output of decoder block `layer`} of a forward pass stopped after the deepest one."""
    blocks, captured, deepest = decoder_blocks(model), {}, max(layers)

    def hook_for(layer):
        def hook(module, args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _StopForward
        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in set(layers)]
    try:
        model.base_model(**inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def residual_stream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: list[int]) -> dict:
    """{layer: (B, T, d) output of decoder block `layer`} from a forward pass that runs no block after
    the deepest requested one and no LM head. Right padding keeps real tokens' outputs unchanged.

    When the examples share their first tokens (every chat-templated example starts with the same BOS
    and system prompt), those are run once and their keys and values reused by every row, as a
    prefix cache does: a causal model's outputs are the same, with fewer tokens computed."""
    shared = shared_prefix_length(input_ids, attention_mask) if _full_attention_only(model) else 0
    if shared < MIN_SHARED_PREFIX:
        return _run_blocks(model, layers, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    from transformers import DynamicCache
    # transformers 5 calls the argument `cache`, earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    prefix_cache, batch_cache, b = DynamicCache(), DynamicCache(), len(input_ids)
    head = _run_blocks(model, layers, input_ids=input_ids[:1, :shared], use_cache=True, **{cache_arg: prefix_cache})
    for i, (keys, values, *_) in enumerate(prefix_cache):
        batch_cache.update(keys.expand(b, -1, -1, -1), values.expand(b, -1, -1, -1), i)
    tail = _run_blocks(model, layers, input_ids=input_ids[:, shared:], attention_mask=attention_mask,
                       use_cache=True, **{cache_arg: batch_cache})
    return {layer: torch.cat([head[layer].expand(b, -1, -1), tail[layer]], dim=1) for layer in layers}
