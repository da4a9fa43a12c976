"""Checkpoints: RUN/checkpoints/step-N/ holds a `save_pretrained` student (safetensors + tokenizer)
plus `trainer_state.pt` (optimizer, scheduler, RNG, prompt-stream position, counters) and
`manifest.json` with a sha256 per file. A checkpoint is written into a temporary folder and
renamed into place only when complete, so a crash mid-write never leaves a half checkpoint
under a real name; one that fails its checksums is skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from opd.faults import crash_point
from opd.lora import save_plain

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, state: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_plain(model, tmp)  # LoRA adapters merged: every checkpoint is a plain transformers model
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    crash_point("checkpoint", step)  # weights on disk, no manifest yet
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync_dir(tmp)
    crash_point("checkpoint_commit", step)  # complete but not yet renamed into place
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    # the `keep` newest up to this one; never this one, whatever a later-numbered folder holds
    for old in [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def set_aside_after(run_dir: Path, step: int | None) -> list[Path]:
    """Move the checkpoints numbered after `step` (None: all of them) to checkpoints/damaged/: a resume that fell back
    past them (they failed their checks) writes those step numbers again, and pruning goes by number."""
    moved = []
    for path in list_checkpoints(run_dir):
        if step is None or checkpoint_step(path) > step:
            target = Path(run_dir) / "checkpoints" / "damaged" / path.name
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(path, target)
            moved.append(target)
    return moved


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoints/step-N folder."""
    return int(Path(path).name[5:])


def verify_checkpoint(path: Path) -> str | None:
    """None when complete and intact, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"missing {name}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {name}"
    return None


def latest_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is damaged ({problem}); falling back to the previous one")
    return None


def load_trainer_state(path: Path) -> dict:
    return torch.load(Path(path) / STATE, weights_only=False)
