"""LoRA adapters on the student (PEFT), merged whenever the student leaves the process.

The adapters are injected into the Hugging Face model in place (`peft.inject_adapter_in_model`), so the
loop keeps working with the same model object: only the adapter weights require grad, so the optimizer
trains only them. Everything written to disk (checkpoints, `final/`, the KL reference) is a merged
plain copy that transformers and vLLM load; resuming reloads the adapter weights themselves from the
trainer state (`adapter_state` / `load_adapter_state`).
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

from opd.config import ConfigError

# peft (and the parts of transformers it pulls in) is imported on first use: ~0.5 s of every `opd` process's start
# otherwise, and most runs have no adapters.


def add_lora(model, *, rank: int, alpha: float, target_modules: list[str]):
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in target_modules if t not in leaf_names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"student.lora_target_modules: {unknown} match no module of {type(model).__name__}; "
                          f"its linear layers are: {', '.join(linear)}")
    tied = _tied_to_the_embedding(model, target_modules)
    if tied:
        raise ConfigError(f"student.lora_target_modules: {tied} shares its weight with the input embedding "
                          "(tie_word_embeddings), so a merged adapter would change the embedding too and the exported "
                          "model would not be the one trained; leave it out of the targets")
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    return inject_adapter_in_model(config, model)


def _tied_to_the_embedding(model, target_modules: list[str]) -> list[str]:
    """The targets whose weight is the input embedding's own tensor (a tied LM head)."""
    embedding = model.get_input_embeddings().weight
    return [name for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in target_modules
            and getattr(m, "weight", None) is embedding]


def has_lora(model) -> bool:
    if "peft" not in sys.modules:  # no adapter can have been injected in this process
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merged_copy(model, *, exact: bool = False):
    """A plain copy of the model with every adapter folded into its base weight (the model itself is unchanged).
    exact: a half-precision (bf16/fp16) base is merged and kept in float32. Folded into a bf16 weight, most of a
    trained adapter's delta is below bf16's spacing there and rounds away (half the delta's entries, in a run
    measured here), so the merged bf16 model is not the one that was trained; base + delta is exact in float32."""
    if not has_lora(model):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(model)
    if exact and any(p.dtype in (torch.bfloat16, torch.float16) for p in plain.parameters()):
        plain = plain.float()
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, attr = name.rpartition(".")
            setattr(plain.get_submodule(parent), attr, module.get_base_layer())
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    return plain


def save_plain(model, folder) -> None:
    """save_pretrained of the merged model: what transformers and vLLM load, with or without LoRA (a half-precision
    LoRA student is saved in float32: merged exactly, see merged_copy)."""
    merged_copy(model, exact=True).save_pretrained(folder, safe_serialization=True)
    # safetensors writes its files owner-only (0600); the folder is meant for other readers too (a vLLM server under
    # another user on shared storage): the modes the user's umask gives any other file
    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).glob("*.safetensors"):
        f.chmod(0o666 & ~umask)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if ".lora_" in k}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(adapter_state(model)) != set(state):
        raise ConfigError("the checkpoint's LoRA adapters do not fit this student (were student.lora_* changed?); "
                          "resume with the run's own config")
