import json
import os
import subprocess
import sys
from pathlib import Path

OPD = [sys.executable, "-m", "opd.cli"]


def opd(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*OPD, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_opd_run_from_a_toml_file_and_resume(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        "seed = 3\n[prompts]\nbatch_size = 4\neval_size = 8\n[eval]\nsize = 8\n"
        "[student]\nwarm_start_steps = 2\nwarm_start_samples = 8\n[rollout]\nmax_new_tokens = 32\n"
    )
    out = tmp_path / "run"
    r = opd("run", str(cfg), "--max-steps", "2", "--out", str(out), "--set", "train.checkpoint_every=1")
    assert r.returncode == 0, r.stderr
    assert (out / "final" / "model.safetensors").is_file()
    assert "seed = 3" in (out / "config.toml").read_text()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    r = opd("run", "--resume", str(out), "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [0, 1, 2, 3]


def test_bad_config_exits_2_with_a_message_and_no_traceback(tmp_path):
    r = opd("run", "--set", "rollout.temperature=0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "rollout.temperature" in r.stderr and "Traceback" not in r.stderr + r.stdout
    r = opd("run", "--set", "teacher.model='nowhere/model'", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "nowhere/model" in r.stderr and "Traceback" not in r.stderr


def test_config_prints_default_toml():
    r = opd("config")
    assert r.returncode == 0 and "[rollout]" in r.stdout and 'model = "builtin:arith-teacher"' in r.stdout


def test_bad_input_is_answered_before_torch_is_imported(tmp_path):
    # A typo in a config or an option costs no import of torch and transformers (seconds on a small machine).
    code = ("import sys; from opd.cli import app\n"
            "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    print(e.code, 'torch' in sys.modules)")
    for args in (["run", "--set", "rollout.temperature=0"], ["offline", "--set", "prompts.batch_size=0"],
                 ["serve-teacher", "builtin:arith-teacher", "--dtype", "float64"],
                 ["run", "--resume", str(tmp_path), "--out", str(tmp_path / "branch")]):  # --out would be ignored
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert r.stdout.split() == ["2", "False"], (args, r.stdout, r.stderr)
        assert "error:" in r.stderr


def test_serve_teacher_on_a_taken_port_says_so_and_announces_nothing():
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        r = opd("serve-teacher", "builtin:arith-teacher", "--port", str(holder.getsockname()[1]))
    finally:
        holder.close()
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and "--port" in r.stderr
    assert "serving" not in r.stdout and "Traceback" not in r.stderr


def test_serve_teacher_bad_input_exits_2_with_a_message():
    r = opd("serve-teacher", "builtin:arith-teacher", "--dtype", "float64")
    assert r.returncode == 2 and "--dtype 'float64'" in r.stderr and "Traceback" not in r.stderr
    r = opd("serve-teacher", "builtin:arith-teacher", "--device", "gpu")
    assert r.returncode == 2 and "--device 'gpu'" in r.stderr and "Traceback" not in r.stderr
    r = opd("serve-teacher", "nowhere/model")
    assert r.returncode == 2 and "model not found: 'nowhere/model'" in r.stderr and "Traceback" not in r.stderr
    r = opd("serve-teacher", "builtin:arith-teacher", "--max-model-len", "0")
    assert r.returncode == 2 and "--max-model-len" in r.stderr and "Traceback" not in r.stderr
    r = opd("run", "--set", "teacher.url='http://127.0.0.1:9'")  # a server cannot give reverse_kl its distribution
    assert r.returncode == 2 and "objective.name = 'pg'" in r.stderr.replace("\n", " ")


def test_a_run_folder_with_brackets_keeps_its_name_in_every_message(tmp_path):
    # Messages went through rich markup: "runs/sweep[lr]" printed as "runs/sweep" in the resume command and
    # "outputs in" line; a path with "[/x]" raised a MarkupError. Piped output also hard-wrapped the command.
    from typer.testing import CliRunner

    from opd.cli import app

    run_dir = tmp_path / "sweep[lr]" / "a-rather-long-folder-name-so-that-the-line-is-past-eighty-columns"
    res = CliRunner().invoke(app, ["run", "--out", str(run_dir), "--max-steps", "1", "--set", "eval.size=4",
                                   "--set", "student.warm_start_steps=1", "--set", "student.warm_start_samples=4",
                                   "--set", "monitor.live='off'", "--set", "eval.recovery_size=0",
                                   "--set", "monitor.tensorboard=false"])
    assert res.exit_code == 0, res.output
    assert f"outputs in {run_dir}: metrics.jsonl, checkpoints/, final/" in res.output  # no tensorboard/ written
    res = CliRunner().invoke(app, ["run", "--out", str(run_dir)])  # a second run there: refused, naming the folder
    assert res.exit_code == 2 and f"continue it with --resume {run_dir}," in res.output
