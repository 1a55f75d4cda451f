"""Export an SAE in SAELens' on-disk format (cfg.json + sae_weights.safetensors), one architecture per variant.

SAELens runs on raw activations x: codes = f((x − b_dec) W_enc + b_enc), x̂ = codes W_dec + b_dec. Ours runs on
x_s = s·x (sae/model.py): codes = f(W_enc(s·x − b_pre) + b_enc), x̂ = (codes W_dec + b_pre) / s, with unit-norm
rows of W_dec. Dividing our codes by s > 0 changes neither which features the TopK keeps nor the ReLU, so with

    W_enc' = W_encᵀ,  b_enc' = b_enc / s,  b_dec = b_pre / s,  W_dec' = W_dec (unit-norm rows, as SAELens expects)

SAELens' codes are ours / s, in the units of x, and its reconstructions are ours exactly. For an SAE that
layer-norms each token (input_norm="layer_norm") the same holds with x_n in place of x: cfg.json says
"normalize_activations": "layer_norm", whose formulas sae/model.py follows, and SAELens normalizes each
token before encoding and restores its mean and scale after decoding.
- TopK (with or without Matryoshka prefixes: inference ignores them) → architecture "topk" with our K.
- BatchTopK → architecture "jumprelu" with threshold' = threshold / s for every feature: at inference our
  BatchTopK keeps ReLU(pre) where pre > threshold, which is JumpReLU (SAELens saves trained BatchTopK SAEs
  the same way).
"""
import json
import os
from importlib.metadata import PackageNotFoundError, version

from safetensors.torch import save_file

from .files import write_atomic, write_text_atomic


def saelens_state_dict(sae) -> dict:
    s = sae.scale.item()
    out = {"W_enc": sae.W_enc_MD.detach().t(), "b_enc": sae.b_enc_M.detach() / s, "W_dec": sae.W_dec_MD.detach(),
           "b_dec": sae.b_pre_D.detach() / s}
    if sae.batch_topk:
        out["threshold"] = (sae.threshold.detach() / s).expand(sae.m)
    return {k: v.float().cpu().contiguous() for k, v in out.items()}


def saelens_cfg(sae, meta: dict) -> dict:
    """cfg.json: the architecture and sizes, and what SAELens' tools need to find the model and hook."""
    cfg = {"architecture": "jumprelu" if sae.batch_topk else "topk", "d_in": sae.d_in, "d_sae": sae.m,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": sae.input_norm,
           "reshape_activations": "none"}
    if not sae.batch_topk:
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    source = meta.get("model_source") or ""
    metadata = {"model_name": meta.get("model"), "model_class_name": "HookedTransformer",
                "model_from_pretrained_kwargs": {}, "hook_name": meta.get("hook"), "hook_head_index": None,
                "prepend_bos": False,  # the chat template writes its own first token, as in fine-tuning
                "context_size": meta.get("max_length"), "dataset_path": meta.get("dataset_path"),
                "model_source": source}
    if ".gguf" in source:
        metadata["model_weights_note"] = ("trained on activations of this GGUF file's weights, dequantized to "
                                          "float32 (quantized, not the original checkpoint's weights)")
    try:  # the version that loads it here, when SAELens is installed; otherwise SAELens fills in its own
        metadata["sae_lens_version"] = version("sae-lens")
    except PackageNotFoundError:
        pass
    cfg["metadata"] = metadata
    return cfg


def export_saelens(sae, folder: str, meta: dict) -> str:
    """Write folder/cfg.json and folder/sae_weights.safetensors (each atomically); return the folder."""
    os.makedirs(folder, exist_ok=True)
    weights = saelens_state_dict(sae)
    write_atomic(os.path.join(folder, "sae_weights.safetensors"), lambda tmp: save_file(weights, tmp))
    write_text_atomic(os.path.join(folder, "cfg.json"), json.dumps(saelens_cfg(sae, meta), indent=2))
    return folder
