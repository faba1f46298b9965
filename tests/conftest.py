"""Fixtures: the tiny tokenizer, a corpus folder and a saved tiny model of every supported family."""

from __future__ import annotations

import os

import pytest

from minitron.tiny import make_config, make_model, make_text, make_tokenizer  # noqa: F401 (tests import them from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never reaches for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "nemotron"]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A folder with a few text files of make_text()."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (d / f"doc{i}.txt").write_text(make_text(300, seed=10 + i))
    return d


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path, family, tokenizer):
    """A saved tiny model dir (safetensors + tokenizer) of each family."""
    model = make_model(family)
    out = tmp_path / f"tiny-{family}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
