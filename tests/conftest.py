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

    def make(name: str, *overrides: str):
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return compose(name, overrides=list(overrides))

    return make
