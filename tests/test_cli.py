"""ds_study.cli: a user's mistake is reported in one or two lines without a traceback (issue 17,
"First run as a new user"); --verbose shows it; a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ds_study import cli, runner


def run_cli(module: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(runner.REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("module, args, says", [
    ("ds_study.profile", ["plan=banana"], "unknown setting 'plan'"),  # profile's key is `plans`
    ("ds_study.evaluate", ["model_pair=tiny", "plan=banana"], "cannot parse plan 'banana'"),
    ("ds_study.evaluate", ["model_pair=tiny", "plan=99-100"], "outside layers 0..7"),
    ("ds_study.evaluate", ["model_pair=tiny", "model_pair.sender=/tmp/does-not-exist"], "model_pair.sender=/tmp/does-not-exist: does not exist"),
    ("ds_study.evaluate", ["model_pair=custom"], "needs model_pair.receiver, model_pair.sender"),
    ("ds_study.evaluate", ["model_pair=nope"], "available: custom,"),
    ("ds_study.study", ["model_pair=tiny", "split=dev"], "split must be 'profile' or 'test'"),
    ("ds_study.zoo", ["verify_only=true", "colour=red"], "unknown setting 'colour'"),
])
def test_user_errors_are_one_or_two_lines_without_a_traceback(tmp_path, module, args, says):
    r = run_cli(module, *args, "results_root=runs" if module != "ds_study.zoo" else "out=zoo_out", cwd=tmp_path)
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode == cli.EXIT_USER_ERROR, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(out) <= 2, "\n".join(out)
    assert out[0].startswith("error: ") and says in out[0]
    assert "--verbose" in out[-1]
    assert not (tmp_path / "runs").exists()


def test_verbose_shows_the_traceback(tmp_path):
    r = run_cli("ds_study.evaluate", "model_pair=tiny", "plan=banana", "--verbose", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "PlanError: cannot parse plan 'banana'" in r.stderr


def test_bugs_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog"])

    def bug():
        return {}["missing"]  # a KeyError in the project's code is a bug, not a user error

    with pytest.raises(KeyError):
        cli.run(bug)

    def library_value_error():
        return int("not a number")  # raised inside Python, not by a check of the project

    with pytest.raises(ValueError):
        cli.run(library_value_error)


def test_project_checks_are_user_errors(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def bad_setting():
        runner.workers_of({"workers": "many"})

    with pytest.raises(SystemExit) as e:
        cli.run(bad_setting)
    assert e.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: workers must be a positive integer or 'auto', got 'many'" and len(err) == 2
    assert "HYDRA_FULL_ERROR" not in os.environ  # restored after the run
