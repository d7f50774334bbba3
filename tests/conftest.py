"""Tests never touch the Hugging Face Hub, and use few threads on the shared 2-core machines."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def compose_cfg():
    from hydra import compose, initialize_config_dir

    from ds_study.runner import CONF_DIR

    from tiny_pair import with_fixture_defaults

    def make(name: str, *overrides: str):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(name, overrides=with_fixture_defaults(name, list(overrides)))

    return make


@pytest.fixture
def refused_before_weights(compose_cfg, tmp_path, monkeypatch):
    """``check(main, config_name, override, message)``: the job refuses the override with a ValueError
    matching ``message`` before loading any weights or creating a run directory."""
    from ds_study import runner

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_pair_from", no_weights)

    def check(main, config_name: str, override: str, message: str) -> None:
        cfg = compose_cfg(config_name, override, f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells")
        with pytest.raises(ValueError, match=message):
            main(cfg)
        assert not (tmp_path / "runs").exists()

    return check
