import json

import pytest

from opd.compare import _markdown_to_html, _targets, run_compare
from opd.handling_study import OPTIONS, study_lines, verdict
from opd.config import ConfigError, load_config
from opd.loop import run
from opd.monitor import read_metrics
from opd.teacher.local import LocalTeacher

TINY = ["student.warm_start_steps=20", "student.warm_start_samples=32", "prompts.batch_size=4", "eval.size=8",
        "eval.every=2", "train.max_steps=4", "monitor.tensorboard=false", "monitor.live='off'", "train.checkpoint_every=0"]


def test_teacher_free_control_never_asks_the_teacher_during_training(tmp_path, monkeypatch):
    calls = []
    real = LocalTeacher.score
    monkeypatch.setattr(LocalTeacher, "score", lambda self, r, full=False: calls.append(len(r.texts)) or real(self, r, full=full))
    cfg = load_config(None, TINY + ["objective.name='pg'", "feedback.constant_advantage=-0.5", "eval.every=0"])
    run(cfg, tmp_path, log=lambda *a: None)
    rows = read_metrics(tmp_path)
    # the two evaluations (step 0 and the end: their samples, then the recovery continuations), never a training step
    assert len(calls) == 4
    assert all(r["budget/teacher_tokens"] == rows[0]["budget/teacher_tokens"] for r in rows)  # only the warm start
    assert all(r["opd/advantage_mean"] == pytest.approx(-0.5) for r in rows[1:])
    assert not any(k.startswith("teacher/") for k in rows[-1])


def test_the_control_drops_the_base_configs_feedback_shaping(tmp_path):
    # opd compare builds its control from the user's config: whitening, discounting, clipping or broken-prefix
    # handling there would change (or refuse) the constant A_t
    from opd.compare import method_overrides

    base = ["feedback.normalize=true", "feedback.gamma=0.9", "feedback.clip=0.1", "feedback.broken_prefix='truncate'"]
    cfg = load_config(None, base)
    control = load_config(None, base + method_overrides("control", cfg, tmp_path, -0.5))
    f = control.feedback
    assert (f.constant_advantage, f.normalize, f.gamma, f.clip, f.broken_prefix) == (-0.5, False, 0.0, 0.0, "keep")


def test_offline_gets_as_many_completions_as_on_policy_scores_with_several_samples_per_prompt(tmp_path):
    # with rollout.samples_per_prompt = 2 on-policy scored twice offline's completions (1,276 vs 832 tokens)
    from opd.compare import method_overrides

    cfg = load_config(None, ["rollout.samples_per_prompt=2", "prompts.batch_size=4", "train.max_steps=10"])
    offline = load_config(None, ["rollout.samples_per_prompt=2", "prompts.batch_size=4", "train.max_steps=10"]
                          + method_overrides("offline", cfg, tmp_path, -0.5))
    assert offline.offline.num_prompts == 10 * 4 * 2


def test_control_needs_pg():
    with pytest.raises(Exception, match="constant_advantage"):
        load_config(None, ["feedback.constant_advantage=-1.0"])


def test_targets_on_a_hand_made_case():
    curves = {"onpolicy": [[{"step": 0, "eval/accuracy": 0.1, "budget/teacher_tokens": 0},
                            {"step": 2, "eval/accuracy": 0.5, "budget/teacher_tokens": 200},
                            {"step": 4, "eval/accuracy": 0.96, "budget/teacher_tokens": 400}]]}
    summary = {"onpolicy": {"eval/accuracy": {"mean": 0.96}},
               "offline": {"eval/accuracy": {"mean": 0.5}, "teacher_tokens": {"mean": 1000.0}}}
    t = _targets(summary, curves, 1.0)
    assert t["meets_95pct_of_teacher"] and t["onpolicy_tokens_to_reach_offline_final"] == 200
    assert t["fraction_of_offline_tokens"] == 0.2 and t["meets_quarter_of_offline_tokens"]
    summary["offline"]["teacher_tokens"]["mean"] = 600.0
    assert not _targets(summary, curves, 1.0)["meets_quarter_of_offline_tokens"]
    # A lucky eval that falls back below offline's final does not count as reaching it.
    curves["onpolicy"][0][1]["eval/accuracy"] = 0.45
    curves["onpolicy"][0][1:1] = [{"step": 1, "eval/accuracy": 0.55, "budget/teacher_tokens": 100}]
    curves["onpolicy"][0][3:3] = [{"step": 3, "eval/accuracy": 0.6, "budget/teacher_tokens": 300}]
    assert _targets(summary, curves, 1.0)["onpolicy_tokens_to_reach_offline_final"] == 300
    curves["onpolicy"][0][-1]["eval/accuracy"] = 0.45
    assert _targets(summary, curves, 1.0)["onpolicy_tokens_to_reach_offline_final"] is None
    # offline ending at or below the shared warm start (step 0): nothing reached with "0% of its tokens"
    flat = {"onpolicy": [[{"step": 0, "eval/accuracy": 0.5, "budget/teacher_tokens": 0},
                          {"step": 2, "eval/accuracy": 0.5, "budget/teacher_tokens": 200}]]}
    t = _targets(summary, flat, 1.0)
    assert t["offline_improved"] is False and t["fraction_of_offline_tokens"] is None
    assert not t["meets_quarter_of_offline_tokens"]


def test_a_seed_whose_final_eval_has_no_reverse_kl_is_reported_not_a_crash(tmp_path):
    # An eval where the teacher scored nothing (its server down) writes no eval/reverse_kl (evaluate.py); the
    # summary, the curves and the table had indexed it in every seed's rows (KeyError).
    from opd.compare import _fmt_over_seeds, _over_seeds, _plots

    finals = [{"eval/accuracy": 0.5, "eval/reverse_kl": 0.2}, {"eval/accuracy": 0.7}]
    kl = _over_seeds(finals, "eval/reverse_kl")
    assert kl["values"] == [0.2] and kl["missing"] == 1 and "1 seed(s) without it" in _fmt_over_seeds(kl)
    assert _over_seeds(finals, "eval/accuracy")["mean"] == 0.6 and "missing" not in _over_seeds(finals, "eval/accuracy")
    assert _over_seeds(finals[1:], "eval/reverse_kl") is None and _fmt_over_seeds(None) == "n/a"
    curves = {"onpolicy": [[{"step": 0, "eval/accuracy": 0.1, "eval/reverse_kl": 0.3}, {"step": 2, **finals[0]}],
                           [{"step": 0, "eval/accuracy": 0.2}, {"step": 2, **finals[1]}]],
              "offline": [[{"step": 0, "eval/accuracy": 0.1}, {"step": 2, "eval/accuracy": 0.3}]]}
    _plots(tmp_path, curves, {"onpolicy": [0.2, 0.1]}, 0.9)
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_study_verdict_needs_a_difference_beyond_the_spread():
    keep = {"mean": 0.50, "std": 0.02}
    assert verdict({"mean": 0.60, "std": 0.03}, keep) == "helps"
    assert verdict({"mean": 0.53, "std": 0.03}, keep) == "no clear effect"  # 0.03 < 0.02 + 0.03
    assert verdict({"mean": 0.40, "std": 0.0}, {"mean": 0.5, "std": 0.0}) == "hurts"
    assert verdict({"mean": 0.51, "std": 0.0}, {"mean": 0.5, "std": 0.0}) == "no clear effect"  # below the 0.02 floor


def test_study_lines_name_what_did_not_help():
    def res(acc, verdict_):
        return {"overrides": ["x=1"], "eval/accuracy": {"mean": acc, "std": 0.0},
                "eval/reverse_kl": {"mean": 0.1, "std": 0.0}, "budget/teacher_tokens": {"mean": 1000.0},
                "first_step/teacher/broken_frac": {"mean": 0.6, "std": 0.0}, "verdict": verdict_}
    study = {"seeds": [0], "steps": 10, "weak_warm_start_steps": 5,
             "weak_start": {"eval/accuracy": 0.1, "eval/reverse_kl": 1.0},
             "options": {"keep": res(0.5, "reference"), "truncate": res(0.4, "hurts"), "downweight": res(0.7, "helps")}}
    md = "\n".join(study_lines(study))
    assert "| truncate (`x=1`) | 0.400 ± 0.000 |" in md and "| 0.60 | hurts |" in md
    assert "Did not help here (numbers above): truncate." in md


def test_markdown_to_html():
    out = _markdown_to_html("# T\n\n| a | b |\n|---|---|\n| 1 | <2> |\n\n![x](p.png)\n- item\n")
    assert "<h1>T</h1>" in out and "<td>&lt;2&gt;</td>" in out and "<img alt='x' src='p.png'>" in out
    assert "<li>item</li>" in out and "---" not in out


@pytest.mark.slow
def test_compare_writes_the_report(tmp_path):
    summary = run_compare(None, TINY, tmp_path, seeds=[0, 1], study_steps=2, weak_warm_start_steps=5,
                          log=lambda *a: None)
    report = tmp_path / "report"
    for f in ("summary.json", "report.md", "report.html", "curves.png", "error_by_position.png"):
        assert (report / f).is_file() and (report / f).stat().st_size > 0, f
    data = json.loads((report / "summary.json").read_text())
    for m in ("onpolicy", "offline", "control"):
        assert len(data[m]["eval/accuracy"]["values"]) == 2 and "std" in data[m]["eval/reverse_kl"]
    assert data["control"]["teacher_tokens"]["mean"] == data["control"]["teacher_tokens"]["values"][0]
    # Matched budgets: offline's stored completions number batch x steps, like on-policy's scored ones.
    on, off = data["onpolicy"]["teacher_tokens"]["mean"], data["offline"]["teacher_tokens"]["mean"]
    assert 0.5 < off / on < 2.0
    assert "teacher" in data and 0 <= data["teacher"]["eval/accuracy"] <= 1
    assert "<img" in (report / "report.html").read_text()
    # Recovery from a planted error: per method over seeds, by corrupted step for every student, a plot and a section.
    for m in ("onpolicy", "offline", "control"):
        for k in ("eval/recovery_rate", "eval/recovery_clean_accuracy", "eval/recovery_rate_likelihood"):
            assert len(data[m][k]["values"]) == 2 and 0 <= data[m][k]["mean"] <= 1
    assert set(data["recovery_by_step"]) == {"warm start", "onpolicy", "offline", "control"}
    assert (report / "recovery.png").stat().st_size > 0
    md = (report / "report.md").read_text()
    assert "## Broken prefixes and recovery" in md and "![recovery](recovery.png)" in md
    # The handling study: every option ran from the weak start, guidance costs teacher tokens, a plot and a table.
    study = data["broken_prefix_study"]
    assert set(study["options"]) == set(OPTIONS) and study["options"]["keep"]["verdict"] == "reference"
    opts = study["options"]
    assert opts["teacher_mix"]["budget/teacher_tokens"]["mean"] > opts["keep"]["budget/teacher_tokens"]["mean"]
    assert "### Handling broken prefixes, from a weak student" in md and (report / "broken_prefix_study.png").is_file()
    assert all(f"| {name} (" in md for name in OPTIONS)
    # A second call reuses every finished run instead of training again.
    again = run_compare(None, TINY, tmp_path, seeds=[0, 1], log=lambda *a: None)
    assert again["onpolicy"]["eval/accuracy"] == summary["onpolicy"]["eval/accuracy"]
    # ... but not runs made with other settings: the report would state settings they never had
    with pytest.raises(ConfigError, match=r"other settings \(train.lr: 0.001 -> 0.01"):
        run_compare(None, [*TINY, "train.lr=0.01"], tmp_path, seeds=[0, 1], log=lambda *a: None)


def test_the_reports_evaluations_read_chat_records_and_stop_strings_like_the_runs(tmp_path):
    # The report's teacher ceiling and final-student rows built their prompt stream without the student's chat
    # template (a chat dataset failed after every run had trained) and sampled without the run's stop strings.
    import json

    import torch
    from transformers import LlamaForCausalLM

    from opd.demo import teacher_accuracy
    from opd.evaluate import eval_sampling
    from opd.models import build_char_tokenizer
    from opd.prompts import prompt_stream
    from opd.teacher.builtin import STUDENT_SHAPE, llama_config

    tok = build_char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(tok, STUDENT_SHAPE)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)})
                            + "\n" for i in range(12)))
    cfg = load_config(None, [f"student.model='{tmp_path / 'm'}'", f"teacher.model='{tmp_path / 'm'}'",
                             "student.init='pretrained'", f"prompts.sources=[{{path='{data}'}}]", "eval.size=4",
                             "eval.max_new_tokens=4", "rollout.stop=['|']"])
    from opd.models import load_tokenizer

    held_out = prompt_stream(cfg, load_tokenizer(cfg.student.model)).eval_prompts(4)
    assert held_out and all(p.text.startswith("<|im_start|>user") for p in held_out)
    assert eval_sampling(cfg).stop == ["|"]
    assert 0.0 <= teacher_accuracy(cfg) <= 1.0
