"""Prompt sources and their weighted mixture: determinism, held-out eval prompts, file formats, resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opd.config import ConfigError, PromptsConfig, SourceConfig
from opd.prompts import PromptStream
from opd.prompts import tasks as tasks_mod
from opd.prompts.tasks import ArithTask


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def cfg(*sources: dict, batch_size: int = 8, eval_size: int = 4, **kw) -> PromptsConfig:
    return PromptsConfig(
        sources=[SourceConfig(**s) for s in sources] or [SourceConfig()], batch_size=batch_size, eval_size=eval_size, **kw
    )


def texts(prompts) -> list[str]:
    return [p.text for p in prompts]


def render(messages: list[dict]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


@pytest.fixture
def numbers_jsonl(tmp_path):
    return write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": f"p{i}", "answer": i} for i in range(20)])


@pytest.fixture
def tiny_task(monkeypatch):
    """A built-in task with only 81 distinct prompts (1-digit operands), so eval/train overlap would show."""
    monkeypatch.setitem(tasks_mod.TASKS, "tiny", ArithTask(name="tiny", min_digits=1, max_digits=1))
    return "tiny"


# --------------------------------------------------------------------------------- determinism
def test_same_seed_same_batches_different_seed_different_batches():
    a, b, c = (PromptStream(cfg(), seed=s) for s in (0, 0, 1))
    batches_a = [texts(a.batch(step)) for step in range(1, 6)]
    assert batches_a == [texts(b.batch(step)) for step in range(1, 6)]
    assert batches_a != [texts(c.batch(step)) for step in range(1, 6)]
    assert batches_a[0] != batches_a[1]  # the step matters
    assert all(len(x) == 8 for x in batches_a)


def test_mixture_is_deterministic_by_seed(numbers_jsonl):
    sources = ({"kind": "builtin", "task": "arith"}, {"kind": "jsonl", "path": str(numbers_jsonl)})
    a, b, c = (PromptStream(cfg(*sources), seed=s) for s in (3, 3, 4))
    batches = [[(p.source, p.text) for p in a.batch(s)] for s in range(1, 6)]
    assert batches == [[(p.source, p.text) for p in b.batch(s)] for s in range(1, 6)]
    assert batches != [[(p.source, p.text) for p in c.batch(s)] for s in range(1, 6)]
    assert a.eval_prompts(8) == b.eval_prompts(8)


def test_builtin_prompts_carry_task_and_answer():
    p = PromptStream(cfg(), seed=0).batch(1)[0]
    a, b = ArithTask.operands(p.text)
    assert p.task == "arith" and p.source == "arith" and p.answer[::-1].lstrip("0") == str(a + b)  # the answer is written least significant digit first


# ---------------------------------------------------------------------------------- held out
def test_builtin_eval_prompts_never_appear_in_training(tiny_task):
    stream = PromptStream(cfg({"kind": "builtin", "task": tiny_task}, batch_size=32, eval_size=30), seed=0)
    held_out = set(texts(stream.eval_prompts(30)))
    assert len(held_out) == 30
    trained = set()
    for step in range(1, 31):
        trained |= set(texts(stream.batch(step)))
    assert not trained & held_out
    assert len(trained | held_out) == 81  # every other prompt is still drawn for training


def test_default_builtin_eval_prompts_never_appear_in_training():
    stream = PromptStream(cfg(batch_size=64, eval_size=64), seed=0)
    held_out = set(texts(stream.eval_prompts(64)))
    assert len(held_out) == 64
    for step in range(1, 11):
        assert not set(texts(stream.batch(step))) & held_out


def test_jsonl_eval_split_and_epochs(numbers_jsonl):
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(numbers_jsonl)}, batch_size=5, eval_size=5), seed=0)
    src = stream.sources[0]
    held_out = set(texts(src.eval))
    train = set(texts(src.train))
    assert len(held_out) == 5 and len(train) == 15 and not held_out & train
    assert held_out | train == {f"p{i}" for i in range(20)}
    assert set(texts(stream.eval_prompts(5))) == held_out
    draws = [t for step in range(1, 10) for t in texts(stream.batch(step))]  # 45 draws = 3 epochs
    for epoch in range(3):
        assert sorted(draws[15 * epoch : 15 * (epoch + 1)]) == sorted(train)  # each epoch: every prompt once
    assert draws[:15] != draws[15:30]  # a fresh permutation per epoch
    assert stream.state_dict()["draws"] == {"numbers": 45}


def test_record_source_keeps_at_least_half_for_training(tmp_path):
    path = write_jsonl(tmp_path / "six.jsonl", [{"prompt": f"q{i}"} for i in range(6)])
    src = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=100), seed=0).sources[0]
    assert len(src.eval) == 3 and len(src.train) == 3


def test_duplicate_records_never_straddle_the_split(tmp_path):
    records = [{"prompt": t} for t in ["a", "b", "a", "c", "a", "d", "b", "e"]]
    path = write_jsonl(tmp_path / "dups.jsonl", records)
    for seed in range(10):
        src = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=2), seed=seed).sources[0]
        assert not set(texts(src.eval)) & set(texts(src.train))
        assert sorted(texts(src.eval) + texts(src.train)) == ["a", "b", "c", "d", "e"]


def test_extra_prompts_come_from_training_and_leave_the_position_alone(numbers_jsonl):
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(numbers_jsonl)}, eval_size=5), seed=0)
    held_out = set(texts(stream.eval_prompts(5)))
    extra = stream.extra_prompts(40, key=1)
    assert len(extra) == 40 and not set(texts(extra)) & held_out
    assert stream.state_dict()["draws"] == {"numbers": 0}
    assert texts(extra) == texts(stream.extra_prompts(40, key=1))


def test_extra_prompts_walk_each_sources_epochs_over_a_mixture(tmp_path):
    # The position in the whole mixture was passed as each source's position: sources jumped around their epochs
    # and 200 draws over two 100-prompt pools gave ~148 distinct prompts.
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(104)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(104)])
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(a)}, {"kind": "jsonl", "path": str(b)}), seed=0)
    extra = texts(stream.extra_prompts(150, key=2))
    per_source = Counter(t[0] for t in extra)
    assert len(set(extra)) == len(extra)  # fewer than 100 from each: no repeats within the epoch
    assert max(per_source.values()) <= 100


def test_prompts_held_out_by_one_source_are_never_trained_through_another(tmp_path, tiny_task):
    shared = [{"prompt": f"s{i}"} for i in range(40)]
    a = write_jsonl(tmp_path / "a.jsonl", shared)
    b = write_jsonl(tmp_path / "b.jsonl", shared[::-1])
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(a)}, {"kind": "jsonl", "path": str(b)}, eval_size=10),
                          seed=0)
    held_out = {p.text for s in stream.sources for p in s.eval}
    drawn = {p.text for step in range(1, 30) for p in stream.batch(step)}
    assert len(held_out) > 10 and drawn and not drawn & held_out
    # a file repeating a built-in task's prompts: the task's held-out ones stay out of the file's training draws
    task = PromptStream(cfg({"kind": "builtin", "task": tiny_task}, eval_size=20), seed=0)
    task_eval = [{"prompt": p.text} for p in task.sources[0].eval] + [{"prompt": f"x{i}"} for i in range(40)]
    both = PromptStream(cfg({"kind": "builtin", "task": tiny_task},
                            {"kind": "jsonl", "path": str(write_jsonl(tmp_path / "t.jsonl", task_eval))},
                            eval_size=20), seed=0)
    held_out = {p.text for s in both.sources for p in s.eval}
    drawn = {p.text for step in range(1, 60) for p in both.batch(step)}
    assert not drawn & held_out
    assert {p.text for p in both.sources[0].eval} <= held_out


def test_a_source_left_without_training_prompts_is_a_config_error(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"s{i}"} for i in range(8)])
    a_eval = PromptStream(cfg({"kind": "jsonl", "path": str(a)}, eval_size=4), seed=0).sources[0].eval
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": p.text} for p in a_eval[:2]])  # all of b's are a's held-out
    with pytest.raises(ConfigError, match="every training prompt is held out"):
        PromptStream(cfg({"kind": "jsonl", "path": str(a)}, {"kind": "jsonl", "path": str(b)}, eval_size=4), seed=0)


def test_eval_prompts_keep_to_the_size_asked_for(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": f"s{i}"} for i in range(10)])  # holds out 5
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": f"b{i}"} for i in range(400)])
    sources = ({"kind": "builtin", "task": "arith"}, {"kind": "jsonl", "path": str(small)},
               {"kind": "jsonl", "path": str(big)})
    stream = PromptStream(cfg(*sources, eval_size=100), seed=0)
    assert len(stream.eval_prompts(1)) == 1 and len(stream.eval_prompts(2)) == 2
    three = stream.eval_prompts(3)
    assert {p.source for p in three} == {"arith", "small", "big"}  # at least one each while the size allows
    many = stream.eval_prompts(150)  # small's share (50) is more than its 5: the others fill in
    by = Counter(p.source for p in many)
    assert len(many) == 150 and by["small"] == 5 and by["arith"] + by["big"] == 145
    assert abs(by["arith"] - by["big"]) <= 1  # equal weights: the shortfall is shared as the weights say
    assert len(stream.eval_prompts(500)) == 205  # all there are


def test_single_source_eval_prompts_are_its_first_held_out_ones(numbers_jsonl):
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(numbers_jsonl)}, eval_size=6), seed=0)
    assert texts(stream.eval_prompts(4)) == texts(stream.sources[0].eval[:4])


# ------------------------------------------------------------------------------------ mixture
def test_weighted_mixture_follows_the_weights():
    sources = (
        {"kind": "builtin", "task": "arith", "name": "big", "weight": 3.0},
        {"kind": "builtin", "task": "arith-short", "name": "small", "weight": 1.0},
    )
    stream = PromptStream(cfg(*sources, batch_size=32, eval_size=8), seed=0)
    counts = Counter(p.source for step in range(1, 101) for p in stream.batch(step))
    share = counts["big"] / sum(counts.values())
    assert abs(share - 0.75) < 0.04  # 3200 draws: sd ~0.008
    assert stream.state_dict()["draws"] == dict(counts)
    for p in stream.batch(101):
        a, b = ArithTask.operands(p.text)
        assert (p.source == "small") == (len(str(a)) == 3)
    ev = Counter(p.source for p in stream.eval_prompts(8))
    assert ev == {"big": 6, "small": 2}


def test_source_names_must_differ(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_jsonl(tmp_path / "a" / "x.jsonl", [{"prompt": "1"}, {"prompt": "2"}])
    b = write_jsonl(tmp_path / "b" / "x.jsonl", [{"prompt": "3"}, {"prompt": "4"}])
    with pytest.raises(ConfigError, match="names must differ"):
        PromptStream(cfg({"kind": "jsonl", "path": str(a)}, {"kind": "jsonl", "path": str(b)}), seed=0)
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(a)}, {"kind": "jsonl", "path": str(b), "name": "other"}), seed=0)
    assert [s.name for s in stream.sources] == ["x", "other"]


def test_unknown_builtin_task():
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": "builtin", "task": "calculus"}), seed=0)
    assert "calculus" in str(e.value) and "arith" in str(e.value)


# ------------------------------------------------------------------------------ file formats
def test_jsonl_prompt_records_with_answers(tmp_path):
    path = write_jsonl(
        tmp_path / "qa.jsonl",
        [{"prompt": "2+2?", "answer": 4}, {"prompt": "capital of France?", "answer": "Paris"}, {"prompt": "poem"},
         {"prompt": "   "}, {"prompt": "héllo ✓"}],
    )
    with pytest.raises(ConfigError, match=r"qa.jsonl:4: empty prompt"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1), seed=0)
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1, on_bad_record="skip"), seed=0)
    src = stream.sources[0]
    by_text = {p.text: p for p in src.eval + src.train}
    assert set(by_text) == {"2+2?", "capital of France?", "poem", "héllo ✓"}  # blank prompt dropped
    assert stream.load_counts()["skipped_records"] == 1
    assert by_text["2+2?"].answer == "4" and by_text["capital of France?"].answer == "Paris"
    assert by_text["poem"].answer is None
    assert all(p.source == "qa" and p.task is None for p in by_text.values())


def test_jsonl_custom_fields_and_blank_lines(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"q": "one", "a": "1"}\n\n{"q": "two", "a": "2"}\n   \n{"q": "three", "a": "3"}\n')
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path), "field": "q", "answer_field": "a"}), seed=0)
    ps = stream.sources[0].eval + stream.sources[0].train
    assert sorted((p.text, p.answer) for p in ps) == [("one", "1"), ("three", "3"), ("two", "2")]


def test_jsonl_chat_records_are_rendered(tmp_path):
    chats = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"}], "answer": str(i)}
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", chats)
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1), seed=0, render_chat=render)
    ps = stream.sources[0].eval + stream.sources[0].train
    assert sorted(texts(ps)) == [f"<system>be brief<user>q{i}<assistant>" for i in range(4)]
    assert sorted(p.answer for p in ps) == ["0", "1", "2", "3"]


def test_jsonl_chat_records_without_a_renderer_are_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)])
    with pytest.raises(ConfigError, match="chat"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)


def test_chat_records_the_template_refuses_or_without_content_are_bad_records(tmp_path):
    # A chat template may raise on a record (Mistral's: roles must alternate): that record is bad, with its line,
    # and on_bad_record = "skip" skips it; a conversation with no content at all is an empty prompt.
    def strict(messages):
        if messages[0]["role"] == "system":
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        return render(messages)

    records = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    records += [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
                {"messages": [{"role": "user", "content": " "}]}, {"messages": []}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(ConfigError, match="chat.jsonl:4: the student's chat template refuses .* roles must alternate"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0, render_chat=strict)
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, on_bad_record="skip", eval_size=1), seed=0,
                          render_chat=strict)
    assert len(stream.sources[0].train) + len(stream.sources[0].eval) == 3
    assert stream.sources[0].counts["skipped_records"] == 3
    records[3] = {"messages": [{"role": "user", "content": ""}]}
    with pytest.raises(ConfigError, match="chat.jsonl:4: empty prompt"):
        PromptStream(cfg({"kind": "jsonl", "path": str(write_jsonl(path, records))}), seed=0, render_chat=strict)


def test_jsonl_record_without_the_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)
    assert "x.jsonl:2" in str(e.value) and "`prompt`" in str(e.value)


def test_jsonl_field_of_the_wrong_type(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}, {"prompt": 5}])
    with pytest.raises(ConfigError, match=r"x.jsonl:2: `prompt` must be a string"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)


def test_jsonl_needs_two_prompts(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "only"}, {"prompt": ""}, {"prompt": "only"}])
    with pytest.raises(ConfigError, match="one.jsonl:2: empty prompt"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}, on_bad_record="skip"), seed=0)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)
    assert f"{path}:3" in str(e.value)


def test_non_object_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a"}\n["b"]\n')
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}), seed=0)
    assert f"{path}:2" in str(e.value) and "object" in str(e.value)


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_missing_path_is_a_config_error(tmp_path, kind):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": kind, "path": str(missing)}), seed=0)
    assert str(missing) in str(e.value) and "not found" in str(e.value)


# ---------------------------------------------------------------------------- HF datasets
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    datasets.disable_progress_bars()
    return datasets


def _records(n=6):
    return {"prompt": [f"r{i}" for i in range(n)], "answer": [str(i) for i in range(n)]}


def test_hf_dataset_folder(tmp_path, hf_cache):
    folder = tmp_path / "ds"
    hf_cache.Dataset.from_dict(_records()).save_to_disk(str(folder))
    stream = PromptStream(cfg({"kind": "hf", "path": str(folder)}, eval_size=2), seed=0)
    src = stream.sources[0]
    assert src.name == "ds"
    assert sorted((p.text, p.answer) for p in src.eval + src.train) == [(f"r{i}", str(i)) for i in range(6)]
    assert set(texts(stream.batch(1))) <= set(texts(src.train))


def test_hf_dataset_dict_split(tmp_path, hf_cache):
    folder = tmp_path / "dd"
    hf_cache.DatasetDict(
        {"train": hf_cache.Dataset.from_dict(_records()), "test": hf_cache.Dataset.from_dict({"prompt": ["t1", "t2"]})}
    ).save_to_disk(str(folder))
    train = PromptStream(cfg({"kind": "hf", "path": str(folder)}), seed=0).sources[0]
    assert len(train.eval + train.train) == 6
    test = PromptStream(cfg({"kind": "hf", "path": str(folder), "split": "test"}), seed=0).sources[0]
    assert sorted(texts(test.eval + test.train)) == ["t1", "t2"]
    with pytest.raises(ConfigError) as e:
        PromptStream(cfg({"kind": "hf", "path": str(folder), "split": "validation"}), seed=0)
    assert "validation" in str(e.value) and "train" in str(e.value)


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_hf_data_files(tmp_path, hf_cache, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        hf_cache.Dataset.from_dict(_records()).to_parquet(str(path))
    else:
        write_jsonl(path, [{"prompt": p, "answer": a} for p, a in zip(*_records().values())])
    src = PromptStream(cfg({"kind": "hf", "path": str(path)}, eval_size=2), seed=0).sources[0]
    assert src.name == "data"
    assert sorted((p.text, p.answer) for p in src.eval + src.train) == [(f"r{i}", str(i)) for i in range(6)]


def test_non_utf8_lines_are_bad_records_and_a_bom_is_not(tmp_path, hf_cache):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "caf\xe9"}\n{"prompt": "third"}\n')
    with pytest.raises(ConfigError, match=r"p.jsonl:2: not UTF-8"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1), seed=0)
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1, on_bad_record="skip"), seed=0)
    src = stream.sources[0]
    assert sorted(texts(src.eval + src.train)) == ["first", "third"]  # the BOM's record is kept
    assert stream.load_counts()["skipped_records"] == 1
    # the `hf` reader finds the bad bytes while iterating: a clear error, not pyarrow's traceback
    with pytest.raises(ConfigError, match="cannot be read as a dataset"):
        PromptStream(cfg({"kind": "hf", "path": str(path)}, eval_size=1), seed=0)


def test_duplicates_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in "aabcca"])
    assert PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=1), seed=0).load_counts()["duplicates"] == 3


def test_hf_unsupported_file_type(tmp_path, hf_cache):
    path = tmp_path / "data.txt"
    path.write_text("r1\nr2\n")
    with pytest.raises(ConfigError, match="unsupported"):
        PromptStream(cfg({"kind": "hf", "path": str(path)}), seed=0)


# ------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("k", [1, 3, 7])
def test_resume_from_state_dict_continues_the_stream(numbers_jsonl, tmp_path, k):
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"o{i}"} for i in range(9)])
    sources = (
        {"kind": "builtin", "task": "arith"},
        {"kind": "jsonl", "path": str(numbers_jsonl), "weight": 2.0},
        {"kind": "jsonl", "path": str(other)},
    )
    make = lambda: PromptStream(cfg(*sources, batch_size=6, eval_size=3), seed=5)  # noqa: E731
    uninterrupted = make()
    for step in range(1, k + 1):
        uninterrupted.batch(step)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # survives serialisation
    resumed = make()
    resumed.load_state_dict(state)
    fresh = make()
    expected = [texts(uninterrupted.batch(s)) for s in (k + 1, k + 2)]
    assert [texts(resumed.batch(s)) for s in (k + 1, k + 2)] == expected
    assert [texts(fresh.batch(s)) for s in (k + 1, k + 2)] != expected  # the position matters
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_with_changed_data_or_eval_size_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=8), seed=0)
    stream.batch(1)
    state = json.loads(json.dumps(stream.state_dict()))
    PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=8), seed=0).load_state_dict(state)  # unchanged
    with pytest.raises(ConfigError, match="prompts.eval_size"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=10), seed=0).load_state_dict(state)
    write_jsonl(path, [{"prompt": f"p{i}"} for i in range(41)])  # one record more reshuffles the split
    with pytest.raises(ConfigError, match="prompts changed since the checkpoint: p"):
        PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=8), seed=0).load_state_dict(state)
    old = {"draws": state["draws"]}  # a checkpoint from before the check resumes as it did
    PromptStream(cfg({"kind": "jsonl", "path": str(path)}, eval_size=8), seed=0).load_state_dict(old)


def test_rewind_draws_the_dropped_steps_prompts_again(numbers_jsonl):
    sources = ({"kind": "builtin", "task": "arith"}, {"kind": "jsonl", "path": str(numbers_jsonl)})
    a = PromptStream(cfg(*sources), seed=3)
    b = PromptStream(cfg(*sources), seed=3)
    a.batch(1)
    b.batch(1)
    expected = [texts(a.batch(s)) for s in (2, 3)]
    b.batch(2), b.batch(3)
    b.rewind([2, 3])  # made ahead, then dropped: drawn again as if never drawn
    assert [texts(b.batch(s)) for s in (2, 3)] == expected


def test_state_dict_is_a_snapshot(numbers_jsonl):
    stream = PromptStream(cfg({"kind": "jsonl", "path": str(numbers_jsonl)}), seed=0)
    stream.batch(1)
    state = stream.state_dict()
    stream.batch(2)
    assert state["draws"] == {"numbers": 8}


# --------------------------------------------------------------------------------- property
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompts=st.lists(st.text(max_size=12), min_size=0, max_size=25),
    eval_size=st.integers(1, 10),
    batch_size=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_jsonl_split_is_a_partition_and_training_stays_in_train(
    tmp_path_factory, prompts, eval_size, batch_size, seed
):
    path = write_jsonl(tmp_path_factory.mktemp("hyp") / "p.jsonl", [{"prompt": p} for p in prompts])
    non_empty = {p for p in prompts if p.strip()}
    c = cfg({"kind": "jsonl", "path": str(path)}, batch_size=batch_size, eval_size=eval_size, on_bad_record="skip")
    if len(non_empty) < 2:
        with pytest.raises(ConfigError):
            PromptStream(c, seed=seed)
        return
    stream = PromptStream(c, seed=seed)
    src = stream.sources[0]
    train, held_out = set(texts(src.train)), set(texts(src.eval))
    assert train | held_out == non_empty
    assert not train & held_out
    assert len(src.train) == len(train) >= len(held_out) >= 1
    drawn: list[str] = []
    step = 0
    while len(drawn) < 2 * len(train):
        step += 1
        drawn += texts(stream.batch(step))
    assert set(drawn) <= train
    n = len(train)
    assert set(drawn[:n]) == train and set(drawn[n : 2 * n]) == train  # each epoch visits every prompt once


def test_prompt_lengths_count_as_the_sampler_tokenises_a_template_bos(tmp_path):
    # A chat template that writes the BOS itself (Gemma-3-it's {{ bos_token }}): the sampler adds no second one,
    # so the length check must not count one either (a prompt that fitted was skipped as too long).
    from opd.config import load_config
    from opd.models import load_tokenizer
    from opd.prompts import prompt_stream
    from opd.rollout.sampler import encode_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"<s>{i}+{i}="} for i in range(10, 20)])
    cfg = load_config(None, [f"prompts.sources=[{{kind='jsonl', path='{path}'}}]", "prompts.eval_size=2",
                             "prompts.on_long_prompt='skip'"])
    tokenizer = load_tokenizer(cfg.student.model)
    ids, _ = encode_prompts(tokenizer, [PromptStream(cfg.prompts, 0).sources[0].train[0]], 10_000)
    cfg.prompts.max_prompt_tokens = ids.shape[1]  # exactly what the sampler feeds the model
    stream = prompt_stream(cfg, tokenizer)
    assert stream.load_counts()["skipped_long"] == 0 and len(stream.sources[0].train) == 8
