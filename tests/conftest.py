"""Fixtures: the tiny tokenizer, a corpus folder and a saved tiny model of every supported family."""

from __future__ import annotations

import os

import pytest

from minitron.arch.tiny import make_config, make_model, make_text, make_tokenizer  # noqa: F401 (tests import them from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never reaches for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest -n N: each worker takes its share of the cores
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "nemotron"]


@pytest.fixture(scope="session", autouse=True)
def _test_cache(tmp_path_factory):
    """MINITRON_CACHE -> a session tmp dir, so the suite never writes token stores (or anything else) into
    ~/.cache/minitron. The user's installed read-only assets (the converted default model, the default corpus,
    task files) are linked in when present, so tests that use them neither fail nor rebuild them."""
    from minitron.arch.models import cache_dir

    user, tmp = cache_dir(), tmp_path_factory.mktemp("minitron-cache")
    for name in ("models", "corpus", "tasks"):
        if (user / name).is_dir():
            (tmp / name).symlink_to(user / name, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINITRON_CACHE", str(tmp))
        yield tmp


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


def distill_pair(teacher, student, tokenizer, corpus_dir, tmp_path, steps: int = 6) -> tuple:
    """Save teacher and student (with the tokenizer) under tmp_path and distill the student for `steps` steps on
    the tiny corpus (seq 32, batch 4, lr 1e-3). Returns (output dir, its minitron_distill.json)."""
    import json

    from minitron.distill import DistillConfig, distill

    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = distill(DistillConfig(teacher=str(tmp_path / "teacher"), student=str(tmp_path / "student"),
                                data=str(corpus_dir), out=str(tmp_path / "kd"), steps=steps, seq_len=32, batch_size=4,
                                eval_every=steps, eval_batches=2, save_every=steps, lr=1e-3, min_lr=1e-4,
                                warmup_steps=1, progress=False))
    return out, json.loads((out / "minitron_distill.json").read_text())


def assert_same_and_generates(reloaded, model, ids) -> None:
    """reloaded gives model's logits on ids [B, T] and generates 8 greedy tokens the same with and without the
    KV cache."""
    import torch

    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    a = reloaded.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=True)
    b = reloaded.generate(ids[:, :6], max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and a.shape[1] == 14
