"""Config: defaults, TOML loading, --set overrides, error messages, to_toml round trip, reference, CLI errors."""

from __future__ import annotations

import math
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from typer.testing import CliRunner

from opd.config import (
    Config,
    ConfigError,
    SourceConfig,
    apply_overrides,
    load_config,
    parse_override,
    reference_markdown,
    to_toml,
    validate_config,
)


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        validate_config(data)
    return str(e.value)


def _sections() -> dict[str, type[BaseModel]]:
    return {
        name: f.annotation
        for name, f in Config.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }


# ------------------------------------------------------------------------------------ defaults
def test_defaults_validate_and_have_the_documented_values():
    cfg = validate_config({})
    assert cfg == Config() == load_config()
    assert cfg.seed == 0
    assert cfg.student.model == "builtin:arith-student" and cfg.teacher.model == "builtin:arith-teacher"
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.objective.name == "reverse_kl" and cfg.train.max_steps == 600
    assert cfg.train.betas == (0.9, 0.999)
    assert len(cfg.prompts.sources) == 1
    assert cfg.prompts.sources[0].kind == "builtin" and cfg.prompts.sources[0].task == "arith"


def test_every_field_has_a_description():
    models = [*_sections().values(), SourceConfig]
    missing = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items() if not f.description]
    assert missing == [] and Config.model_fields["seed"].description


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.rollout.temperature = -1.0


# --------------------------------------------------------------------------------- TOML loading
def test_load_toml_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(
        'seed = 7\n[rollout]\ntemperature = 0.7\nstop = ["\\n", "END"]\n[train]\nlr = 5e-4\nbetas = [0.8, 0.95]\n'
        '[[prompts.sources]]\nkind = "builtin"\ntask = "arith-short"\nweight = 3.0\n'
        '[[prompts.sources]]\nkind = "jsonl"\npath = "data/x.jsonl"\n'
    )
    cfg = load_config(p)
    assert cfg.seed == 7
    assert cfg.rollout.temperature == 0.7 and cfg.rollout.stop == ["\n", "END"]
    assert cfg.train.lr == 5e-4 and cfg.train.betas == (0.8, 0.95)
    assert [s.kind for s in cfg.prompts.sources] == ["builtin", "jsonl"]
    assert cfg.prompts.sources[0].weight == 3.0 and cfg.prompts.sources[1].path == "data/x.jsonl"
    # untouched keys keep their defaults
    assert cfg.rollout.max_new_tokens == Config().rollout.max_new_tokens


def test_load_with_overrides_on_top_of_the_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("seed = 7\n[rollout]\ntemperature = 0.7\n")
    cfg = load_config(p, ["rollout.temperature=0.25", "train.max_steps=3", "objective.name=reverse_kl"])
    assert cfg.seed == 7
    assert cfg.rollout.temperature == 0.25
    assert cfg.train.max_steps == 3
    assert cfg.objective.name == "reverse_kl"


# ----------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "item, path, value",
    [
        ("rollout.temperature=0.5", ["rollout", "temperature"], 0.5),
        ("train.max_steps=10", ["train", "max_steps"], 10),
        ("seed=3", ["seed"], 3),
        ("monitor.tensorboard=false", ["monitor", "tensorboard"], False),
        ('student.model="a/b"', ["student", "model"], "a/b"),
        ("student.model=nowhere/model", ["student", "model"], "nowhere/model"),  # not TOML -> the string
        ("objective.name=gkd", ["objective", "name"], "gkd"),
        ('rollout.stop=["\\n", \'x\']', ["rollout", "stop"], ["\n", "x"]),
        ("rollout.stop=['\\n']", ["rollout", "stop"], ["\\n"]),  # TOML literal string: no escapes
        ("train.betas=[0.8, 0.9]", ["train", "betas"], [0.8, 0.9]),
        (" rollout.temperature = 0.5 ", ["rollout", "temperature"], 0.5),
        ("student.model=a=b", ["student", "model"], "a=b"),
        ("prompts.sources.0.path=", ["prompts", "sources", "0", "path"], ""),
    ],
)
def test_parse_override(item, path, value):
    got_path, got_value = parse_override(item)
    assert got_path == path
    assert got_value == value and type(got_value) is type(value)


@pytest.mark.parametrize("item", ["rollout.temperature", "=1", "  =1", ""])
def test_parse_override_rejects_malformed_items(item):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(item)


def test_apply_overrides_creates_sections_and_replaces_values():
    data = {"rollout": {"temperature": 0.7, "top_p": 0.9}}
    out = apply_overrides(data, ["rollout.temperature=0.1", "train.lr=0.01", "seed=5"])
    assert out == {"rollout": {"temperature": 0.1, "top_p": 0.9}, "train": {"lr": 0.01}, "seed": 5}


def test_apply_overrides_later_items_win():
    assert apply_overrides({}, ["seed=1", "seed=2"]) == {"seed": 2}


def test_apply_overrides_into_a_non_section_is_an_error():
    with pytest.raises(ConfigError) as e:
        apply_overrides({"seed": 1}, ["seed.x=2"])
    assert "seed" in str(e.value) and "not a section" in str(e.value)


# ------------------------------------------------------------------------------------- errors
def test_unknown_key_suggests_and_lists_allowed_keys():
    msg = _error({"rollout": {"tempreature": 1.0}})
    assert "unknown key `rollout.tempreature`" in msg
    assert "did you mean `temperature`?" in msg
    assert "allowed here:" in msg
    for key in ("temperature", "top_p", "max_new_tokens", "stop", "samples_per_prompt"):
        assert key in msg.split("allowed here:")[1]


def test_unknown_section_suggests_and_lists_sections():
    msg = _error({"rolout": {}})
    assert "unknown key `rolout`" in msg and "did you mean `rollout`?" in msg
    allowed = msg.split("allowed here:")[1]
    for key in ("seed", "student", "teacher", "prompts", "rollout", "train", "monitor"):
        assert key in allowed


def test_unknown_key_without_a_close_match_has_no_suggestion():
    msg = _error({"train": {"zzzzzz": 1}})
    assert "unknown key `train.zzzzzz`" in msg and "did you mean" not in msg
    assert "max_steps" in msg


def test_unknown_key_inside_a_prompt_source():
    msg = _error({"prompts": {"sources": [{"kind": "jsonl", "pathh": "x.jsonl"}]}})
    assert "prompts.sources[0].pathh" in msg and "did you mean `path`?" in msg
    assert "answer_field" in msg.split("allowed here:")[1]


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"rollout": {"max_new_tokens": "many"}}, "rollout.max_new_tokens", "valid integer"),
        ({"rollout": {"temperature": "hot"}}, "rollout.temperature", "valid number"),
        ({"student": {"warm_start_steps": 1.5}}, "student.warm_start_steps", "integer"),
        ({"monitor": {"tensorboard": "maybe"}}, "monitor.tensorboard", "boolean"),
        ({"rollout": {"stop": "END"}}, "rollout.stop", "list"),
        ({"rollout": 3}, "rollout", "dictionary"),
        ({"objective": {"name": "ppo"}}, "objective.name", "'reverse_kl'"),
        ({"student": {"dtype": "int8"}}, "student.dtype", "'bfloat16'"),
        ({"monitor": {"live": "sometimes"}}, "monitor.live", "'off'"),
        ({"rollout": {"decoder": "fast"}}, "rollout.decoder", "'auto'"),
        ({"train": {"autocast": "fp16"}}, "train.autocast", "'bfloat16'"),
    ],
)
def test_wrong_type_names_the_key_and_what_is_allowed(data, key, hint):
    msg = _error(data)
    assert f"`{key}" in msg and hint in msg


@pytest.mark.parametrize(
    "data, key, hint",
    [
        ({"rollout": {"temperature": -1}}, "rollout.temperature", "greater than 0"),
        ({"rollout": {"temperature": 0}}, "rollout.temperature", "greater than 0"),
        ({"rollout": {"top_p": 1.5}}, "rollout.top_p", "less than or equal to 1"),
        ({"rollout": {"top_p": 0}}, "rollout.top_p", "greater than 0"),
        ({"rollout": {"samples_per_prompt": 0}}, "rollout.samples_per_prompt", "greater than or equal to 1"),
        ({"train": {"lr": 0}}, "train.lr", "greater than 0"),
        ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints", "greater than or equal to 1"),
        ({"feedback": {"gamma": 1.5}}, "feedback.gamma", "less than or equal to 1"),
        ({"objective": {"beta": -0.1}}, "objective.beta", "greater than or equal to 0"),
        ({"prompts": {"sources": [{"weight": 0}]}}, "prompts.sources[0].weight", "greater than 0"),
        ({"prompts": {"sources": []}}, "prompts.sources", "at least 1"),
    ],
)
def test_out_of_range_names_the_key_and_the_limit(data, key, hint):
    msg = _error(data)
    assert f"`{key}`" in msg and hint in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.toml")
    assert "not found" in str(e.value) and "nope.toml" in str(e.value)


def test_invalid_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[rollout\ntemperature = 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.toml" in str(e.value) and "not valid TOML" in str(e.value)


def test_a_config_that_is_not_utf8_is_invalid_toml_with_the_byte(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes("# café\nseed = 1\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.toml is not valid TOML: not UTF-8 text \(byte 5"):
        load_config(p)


def test_topk_kl_needs_teacher_topk():
    msg = _error({"objective": {"name": "topk_kl"}})
    assert "topk_kl" in msg and "teacher.topk" in msg
    assert validate_config({"objective": {"name": "topk_kl"}, "teacher": {"topk": 20}}).teacher.topk == 20


def test_hybrid_needs_a_group():
    msg = _error({"objective": {"name": "hybrid"}, "rollout": {"samples_per_prompt": 1}})
    assert "hybrid" in msg and "rollout.samples_per_prompt" in msg
    ok = validate_config({"objective": {"name": "hybrid"}, "rollout": {"samples_per_prompt": 2}})
    assert ok.rollout.samples_per_prompt == 2


@pytest.mark.parametrize(
    "data, hints",
    [
        ({"rollout": {"teacher_mix": 0.5, "teacher_correct_topk": 4}}, ["teacher_mix", "teacher_correct_topk", "only one"]),
        ({"rollout": {"teacher_mix": 0.5, "top_p": 0.9}}, ["teacher_mix", "top_p = 1.0"]),
        ({"rollout": {"teacher_correct_topk": 3},
          "feedback": {"constant_advantage": -0.5}, "objective": {"name": "pg"}}, ["guided", "constant_advantage"]),
        ({"feedback": {"broken_prefix": "truncate", "constant_advantage": -0.5}, "objective": {"name": "pg"}},
         ["broken_prefix", "truncate", "constant_advantage", "'keep'"]),
        ({"rollout": {"teacher_mix": 1.5}}, ["rollout.teacher_mix", "less than or equal to 1"]),
        ({"feedback": {"broken_prefix": "cut"}}, ["feedback.broken_prefix", "'keep', 'truncate' or 'downweight'"]),
        ({"feedback": {"break_logprob": 1.0}}, ["feedback.break_logprob", "less than or equal to 0"]),
        ({"feedback": {"break_window": 0}}, ["feedback.break_window", "greater than or equal to 1"]),
    ],
)
def test_broken_prefix_and_guided_rollout_settings_are_checked(data, hints):
    msg = _error(data)
    for h in hints:
        assert h in msg, (h, msg)


def test_guided_rollouts_and_handling_validate():
    cfg = validate_config({"rollout": {"teacher_mix": 0.3}, "feedback": {"broken_prefix": "truncate", "keep_after_break": 2}})
    assert cfg.rollout.teacher_mix == 0.3 and cfg.feedback.keep_after_break == 2


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_file_sources_need_a_path(kind):
    msg = _error({"prompts": {"sources": [{"kind": kind}]}})
    assert "prompts.sources[0]" in msg and "`path`" in msg and kind in msg
    assert validate_config({"prompts": {"sources": [{"kind": kind, "path": "x"}]}}).prompts.sources[0].path == "x"


def test_several_errors_are_all_reported():
    msg = _error({"rollout": {"temperature": -1, "top_p": 2}})
    assert "rollout.temperature" in msg and "rollout.top_p" in msg


# -------------------------------------------------------------------------------------- to_toml
def _roundtrip(cfg: Config) -> Config:
    return validate_config(tomllib.loads(to_toml(cfg)))


def test_a_source_with_a_path_reads_it_whatever_its_kind_was_left_at():
    # Left at its default (builtin), a source with a path silently trained on the built-in task instead.
    sources = validate_config({"prompts": {"sources": [{"path": "d/x.jsonl"}, {"path": "d/folder"}]}}).prompts.sources
    assert [s.kind for s in sources] == ["jsonl", "hf"]
    msg = _error({"prompts": {"sources": [{"kind": "builtin", "path": "d/x.jsonl"}]}})
    assert "reads no file" in msg and "kind = 'jsonl'" in msg


def test_a_teacher_name_with_a_dot_round_trips_as_one_key(tmp_path):
    p = tmp_path / "named.toml"
    p.write_text('[teachers."qwen2.5-math"]\nmodel = "builtin:arith-teacher"\n\n'
                 '[[prompts.sources]]\ntask = "arith"\nteacher = "qwen2.5-math"\n')
    cfg = load_config(p)
    assert list(cfg.teachers) == ["qwen2.5-math"] and _roundtrip(cfg) == cfg


def test_to_toml_roundtrips_the_default():
    cfg = Config()
    assert _roundtrip(cfg) == cfg


def test_to_toml_roundtrips_a_customised_config_with_two_sources():
    cfg = validate_config(
        {
            "seed": 42,
            "student": {"init": "pretrained", "dtype": "bfloat16", "device": "cpu"},
            "teacher": {"topk": 8},
            "objective": {"name": "topk_kl", "topk_direction": "reverse"},
            "rollout": {"temperature": 0.3, "top_p": 0.95, "stop": ["\n", 'say "hi"', "back\\slash", "\t", "é✓"]},
            "train": {"betas": [0.5, 0.75], "lr": 1e-20, "schedule": "cosine"},
            "monitor": {"max_failures": [0, 3], "live": "off", "tensorboard": False},
            "prompts": {
                "batch_size": 4,
                "sources": [
                    {"kind": "builtin", "task": "arith-short", "weight": 2.5, "name": "short"},
                    {"kind": "jsonl", "path": "data/my prompts.jsonl", "field": "q", "answer_field": "a"},
                ],
            },
        }
    )
    text = to_toml(cfg)
    assert text.count("[[prompts.sources]]") == 2
    back = _roundtrip(cfg)
    assert back == cfg
    assert back.prompts.sources[1].path == "data/my prompts.jsonl"
    assert back.rollout.stop == ["\n", 'say "hi"', "back\\slash", "\t", "é✓"]


def test_to_toml_escapes_control_characters_in_strings():
    cfg = validate_config({"rollout": {"stop": ["\x00", "\x7f", "\r\n", "\x1b[0m"]}})
    assert _roundtrip(cfg).rollout.stop == ["\x00", "\x7f", "\r\n", "\x1b[0m"]


def test_resolved_config_file_loads_back(tmp_path):
    cfg = load_config(None, ["seed=9", 'rollout.stop=["\\n\\n"]', "train.max_steps=1"])
    p = tmp_path / "config.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg and cfg.rollout.stop == ["\n\n"]


# Property: random valid values survive to_toml -> tomllib -> validate; out-of-range ones are rejected by name.
_finite = dict(allow_nan=False, allow_infinity=False)
_valid = st.fixed_dictionaries(
    {
        "seed": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "rollout": st.fixed_dictionaries(
            {
                "temperature": st.floats(min_value=0, exclude_min=True, **_finite),
                "top_p": st.floats(min_value=0, max_value=1, exclude_min=True, **_finite),
                "max_new_tokens": st.integers(min_value=1, max_value=10**9),
                "stop": st.lists(st.text(max_size=8), max_size=3),
            }
        ),
        "train": st.fixed_dictionaries(
            {
                "lr": st.floats(min_value=0, exclude_min=True, **_finite),
                "weight_decay": st.floats(min_value=0, **_finite),
                "betas": st.tuples(st.floats(0, 1, **_finite), st.floats(0, 1, **_finite)),
            }
        ),
        "feedback": st.fixed_dictionaries({"gamma": st.floats(0, 1, **_finite), "clip": st.floats(0, 1e6, **_finite)}),
        "objective": st.fixed_dictionaries({"beta": st.floats(0, 1, **_finite)}),
    }
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid)
def test_property_valid_values_roundtrip(data):
    data = {**data, "train": {**data["train"], "betas": list(data["train"]["betas"])}}
    cfg = validate_config(data)
    back = _roundtrip(cfg)
    assert back == cfg
    assert back.rollout.temperature == data["rollout"]["temperature"]
    assert back.train.lr == data["train"]["lr"]
    assert back.seed == data["seed"]
    assert back.rollout.stop == data["rollout"]["stop"]


_invalid = st.one_of(
    st.tuples(st.just(("rollout", "temperature")), st.floats(max_value=0, **_finite)),
    st.tuples(st.just(("rollout", "top_p")), st.floats(max_value=0, **_finite)),
    st.tuples(st.just(("rollout", "top_p")), st.floats(min_value=1, exclude_min=True, **_finite)),
    st.tuples(st.just(("train", "lr")), st.floats(max_value=0, **_finite)),
    st.tuples(st.just(("feedback", "gamma")), st.floats(min_value=1, exclude_min=True, **_finite)),
    st.tuples(st.just(("feedback", "gamma")), st.floats(max_value=0, exclude_max=True, **_finite)),
    st.tuples(st.just(("rollout", "max_new_tokens")), st.integers(max_value=0)),
    st.tuples(st.just(("train", "keep_checkpoints")), st.integers(max_value=0)),
    st.tuples(st.just(("prompts", "batch_size")), st.integers(max_value=0)),
)


@settings(max_examples=60, deadline=None)
@given(_invalid)
def test_property_out_of_range_values_are_rejected_by_name(case):
    (section, key), value = case
    msg = _error({section: {key: value}})
    assert f"`{section}.{key}`" in msg
    # also through the --set path, with the value written as TOML
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{section}.{key}={value!r}"])
    assert f"{section}.{key}" in str(e.value)


# ------------------------------------------------------------------------------------ reference
def test_reference_mentions_every_field_of_every_section():
    md = reference_markdown()
    assert "| `seed` |" in md
    for section, model in _sections().items():
        for name in model.model_fields:
            if name == "sources":
                continue
            assert f"| `{section}.{name}` |" in md, f"{section}.{name} missing from the reference"
    for name in SourceConfig.model_fields:
        assert f"| `prompts.sources[].{name}` |" in md
    assert "| `prompts.sources` |" in md


def test_reference_rows_show_defaults_and_descriptions():
    md = reference_markdown()
    row = next(ln for ln in md.splitlines() if ln.startswith("| `rollout.top_p` |"))
    assert "`1.0`" in row and Config.model_fields["rollout"].annotation.model_fields["top_p"].description in row
    row = next(ln for ln in md.splitlines() if ln.startswith("| `objective.name` |"))
    for choice in ("`pg`", "`reverse_kl`", "`gkd`", "`topk_kl`", "`hybrid`"):
        assert choice in row
    # top-level scalars (seed, engine, max_policy_lag, ...) and `teachers` (one row, its tables take the [teacher] keys)
    top = [k for k in Config.model_fields if k not in _sections()]
    n_fields = len(top) + sum(len(m.model_fields) for m in _sections().values()) + len(SourceConfig.model_fields)
    assert sum(1 for ln in md.splitlines() if ln.startswith("| `")) == n_fields


# ------------------------------------------------------------------------------------------ CLI
def _invoke(*args):
    from opd.cli import app

    result = CliRunner().invoke(app, list(args))
    out = result.output
    try:
        out += result.stderr  # click >= 8.2 also mixes stderr into output; harmless duplicate
    except ValueError:
        pass
    return result, out


def _assert_clean_exit_2(result, out):
    assert result.exit_code == 2, out
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out


def test_cli_config_out_of_range_value():
    result, out = _invoke("config", "--set", "rollout.temperature=-1")
    _assert_clean_exit_2(result, out)
    assert "rollout.temperature" in out and "greater than 0" in out


def test_cli_run_missing_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, out = _invoke("run", "nonexistent.toml")
    _assert_clean_exit_2(result, out)
    assert "nonexistent.toml" in out and "not found" in out
    assert not (tmp_path / "runs").exists()


def test_cli_run_misspelt_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result, out = _invoke("run", "--set", "rollout.tempreature=1")
    _assert_clean_exit_2(result, out)
    assert "rollout.tempreature" in out and "did you mean `temperature`" in out
    assert not (tmp_path / "runs").exists()


def test_cli_config_invalid_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("seed = = 1\n")
    result, out = _invoke("config", str(p))
    _assert_clean_exit_2(result, out)
    assert "bad.toml" in out


def test_cli_config_prints_toml_that_loads_back():
    result, out = _invoke("config", "--set", "rollout.temperature=0.5", "--set", 'rollout.stop=["\\n"]')
    assert result.exit_code == 0, out
    cfg = validate_config(tomllib.loads(result.stdout))
    assert cfg.rollout.temperature == 0.5 and cfg.rollout.stop == ["\n"]
    assert not math.isnan(cfg.train.lr)


def test_cli_config_reference():
    result, _ = _invoke("config", "--reference")
    assert result.exit_code == 0
    assert result.stdout == reference_markdown()


# --------------------------------------------------------------------------- teacher servers, routing
REMOTE = {"teacher": {"url": "http://127.0.0.1:8000"}, "objective": {"name": "pg"}}


def test_remote_teacher_and_named_teachers_roundtrip():
    cfg = validate_config({**REMOTE, "teachers": {"judge": {"url": "http://127.0.0.1:9000", "api": "pooling"},
                                                   "math": {"model": "builtin:arith-teacher", "topk": 0}},
                           "prompts": {"sources": [{"name": "a"}, {"name": "b", "teacher": "math"}]}})
    assert cfg.teacher.remote and not cfg.teachers["math"].remote
    assert set(cfg.used_teachers()) == {"default", "math"}  # `judge` is declared but no source picks it
    assert _roundtrip(cfg) == cfg and "[teachers.judge]" in to_toml(cfg)
    assert validate_config({}).teachers == {} and "[teachers" not in to_toml(validate_config({}))


@pytest.mark.parametrize("data, hint", [
    ({"teacher": {"url": "http://h"}}, "needs the teacher's full distribution"),
    ({**REMOTE, "objective": {"name": "gkd"}}, "use objective.name = 'pg', 'topk_kl'"),
    ({"prompts": {"sources": [{"teacher": "nope"}]}}, "is not declared as [teachers.nope]"),
    ({"teachers": {"default": {}}}, "reserved"),
    ({"teacher": {"url": "http://h", "api": "pooling"}, "objective": {"name": "pg"}}, "score-only"),
    ({**REMOTE, "rollout": {"temperature": 0.7}}, "temperature_in_request = true"),
    ({**REMOTE, "objective": {"name": "topk_kl"}, "teacher": {"url": "http://h", "topk": 32}}, "at most 20"),
    ({"objective": {"name": "topk_kl"}, "teacher": {"topk": 5}, "teachers": {"x": {"topk": 3}},
      "prompts": {"sources": [{"teacher": "x"}]}}, "same top-k"),
])
def test_teacher_service_config_errors_say_what_to_do(data, hint):
    assert hint in _error(data)


def test_remote_temperature_is_fine_when_the_server_applies_it():
    cfg = validate_config({**REMOTE, "teacher": {"url": "http://h", "temperature_in_request": True},
                           "rollout": {"temperature": 0.7}})
    assert cfg.rollout.temperature == 0.7


def test_unknown_key_in_a_named_teacher_lists_the_teacher_keys():
    msg = _error({"teachers": {"judge": {"urll": "http://h"}}})
    assert "unknown key `teachers.judge.urll` (did you mean `url`?)" in msg and "max_in_flight" in msg


def test_an_override_sets_one_entry_of_a_list_of_tables():
    data = {"prompts": {"sources": [{"kind": "builtin", "task": "arith"}, {"kind": "jsonl", "path": "a.jsonl"}]}}
    apply_overrides(data, ["prompts.sources[1].weight=3", "prompts.sources[-2].task='copy'"])
    assert data["prompts"]["sources"] == [{"kind": "builtin", "task": "copy"},
                                          {"kind": "jsonl", "path": "a.jsonl", "weight": 3}]
    # with no list in the config, the built-in default's list is the one indexed
    cfg = load_config(None, ["prompts.sources[0].weight=2.5"])
    assert len(cfg.prompts.sources) == 1 and cfg.prompts.sources[0].weight == 2.5
    assert cfg.prompts.sources[0].task == load_config(None).prompts.sources[0].task


@pytest.mark.parametrize("item, message", [
    ("prompts.sources[1].weight=1", r"has 1 entry \(indices 0 to 0\); to add one, set the whole list"),
    ("prompts.batch_size[0]=1", "is not a list"),
    # the path in the message keeps the index, so it names the entry that is wrong
    ("prompts.sources[0].weight.x=1", r"`prompts\.sources\[0\]\.weight` is not a section"),
])
def test_a_bad_list_override_says_what_is_wrong(item, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [item])
