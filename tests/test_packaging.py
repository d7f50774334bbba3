"""The package runs without its checkout (issue 18, "Configs"): the Hydra configs ship inside it as
package data, and what needs the git checkout (the commit in env.json) degrades to unknown.
`.ci/run` checks a real non-editable install from another directory once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ds_study import cli, runner, zoo

PACKAGE = Path(runner.__file__).resolve().parent


def test_every_entry_point_reads_the_configs_inside_the_package():
    assert runner.CONF_DIR == cli.CONF_DIR == zoo.CONF_DIR == PACKAGE / "conf"
    assert (runner.CONF_DIR / "profile.yaml").is_file()
    assert not (runner.REPO_ROOT / "conf").exists(), "the configs moved to ds_study/conf"


def test_the_configs_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((runner.REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ds_study"]
    shipped = {p for pattern in patterns for p in PACKAGE.glob(pattern) if p.is_file()}
    configs = {p for p in runner.CONF_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert configs and configs <= shipped, sorted(str(p) for p in configs - shipped)


def test_environment_outside_a_checkout_records_no_commit(monkeypatch, tmp_path):
    if runner.in_checkout():
        env = runner.environment("cpu")
        assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"]) and isinstance(env["git_dirty"], bool)
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)  # where a non-editable install's package sits
    assert not runner.in_checkout()
    env = runner.environment("cpu")
    assert env["git_commit"] is None and env["git_dirty"] is None
