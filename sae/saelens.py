"""Export a TopK SAE in SAELens' on-disk format (cfg.json + sae_weights.safetensors, architecture "topk").

SAELens computes codes = ReLU(TopK((x − b_dec) W_enc + b_enc)) and x̂ = codes W_dec + b_dec on the raw
activations, so our input scale s is folded into the weights: W_enc' = s·W_enc, b_dec = b_pre / s,
W_dec' = W_dec / s. The TopK choice is unchanged, so SAELens reproduces our reconstructions exactly.
BatchTopK models are exported with their per-token K, which is how SAELens runs BatchTopK SAEs.
"""
import json
import os

from safetensors.torch import save_file

from .files import write_atomic, write_text_atomic

SAELENS_VERSION = "6.0.0"  # the cfg.json layout written here


def saelens_state_dict(sae) -> dict:
    s = sae.scale.item()
    return {"W_enc": (sae.W_enc_MD.detach().t() * s).float().cpu().contiguous(),
            "b_enc": sae.b_enc_M.detach().float().cpu().contiguous(),
            "W_dec": (sae.W_dec_MD.detach() / s).float().cpu().contiguous(),
            "b_dec": (sae.b_pre_D.detach() / s).float().cpu().contiguous()}


def export_saelens(sae, folder: str, meta: dict) -> str:
    """Write folder/cfg.json and folder/sae_weights.safetensors (each atomically); return the folder."""
    os.makedirs(folder, exist_ok=True)
    cfg = {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.m, "k": sae.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"sae_lens_version": SAELENS_VERSION, "model_name": meta.get("model"),
                        "hook_name": meta.get("hook"), "hook_head_index": None, "prepend_bos": False,
                        "context_size": meta.get("max_length"), "dataset_path": meta.get("dataset_path")}}
    weights = saelens_state_dict(sae)
    write_atomic(os.path.join(folder, "sae_weights.safetensors"), lambda tmp: save_file(weights, tmp))
    write_text_atomic(os.path.join(folder, "cfg.json"), json.dumps(cfg, indent=2))
    return folder
