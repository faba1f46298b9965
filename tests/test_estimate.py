"""minitron.pipeline.estimate: the terms of a tiny model equal a hand computation; the per-layer activation formula
equals what autograd saves; the 8B recipes fit 80 GB and a batch-64 variant warns; `minitron plan` prints
the table."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_config
from minitron.cli import main
from minitron.pipeline import RunConfig
from minitron.pipeline import estimate as E
from minitron.pipeline import memory_terms as M
from minitron.pipeline.config import ConfigError, load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "num_hidden_layers": 32, "vocab_size": 128256, "tie_word_embeddings": False,
               "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}


def _tiny():
    # hidden C 64, MLP F 128, 4 heads / 2 KV heads of 16 (A 64, K 32), 2 layers, vocab V 384, tied
    return make_config("llama", layers=2, tie_word_embeddings=True)


def test_shape_of_tiny_llama_by_hand():
    s = M.shape_of(_tiny())
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64   # q, k+v, o, gate/up/down, 2 norms
    assert s.layer_params == layer == 36992
    assert s.params == 384 * 64 + 2 * layer + 64                      # tied embedding once, final norm
    assert s.linear_params == 2 * (layer - 2 * 64)
    assert s.largest_tensor == 384 * 64
    assert s.root_params == 384 * 64 + 64
    assert (s.n_attn_in, s.n_mlp_in, s.gated, s.extra_norms, s.head_norms) == (3, 2, True, 0, False)


def test_terms_of_tiny_llama_by_hand():
    s = M.shape_of(_tiny())
    P = s.params
    assert M.master_states(s, 1, "none") == {"master weights": 4 * P, "grads": 4 * P, "AdamW states": 8 * P}
    assert M.master_states(s, 4, "fsdp")["AdamW states"] == 8 * P // 4
    assert M.master_states(s, 4, "ddp")["DDP buckets"] == 4 * P
    frozen = M.frozen_embedding_params(s)
    assert frozen == 384 * 64                                         # tied: one [V, C] tensor
    assert M.master_states(s, 1, "none", frozen) == {"master weights": 4 * P, "grads": 4 * (P - frozen),
                                                     "AdamW states": 8 * (P - frozen)}
    assert M.fsdp_accumulated_grads(s, frozen) == 4 * (P - frozen)
    # per token and layer: fp32 24C + 8A + 8K + 4H + 16F + 8; autocast 26C + 4A + 4K + 4H + 8F + 8; bf16 16C + ...
    assert M.layer_activations(s, "fp32") == 24 * 64 + 8 * 64 + 8 * 32 + 4 * 4 + 16 * 128 + 8 == 4376
    assert M.layer_activations(s, "autocast") == 26 * 64 + 4 * 64 + 4 * 32 + 4 * 4 + 8 * 128 + 8 == 3096
    assert M.layer_activations(s, "bf16") == 16 * 64 + 4 * 64 + 4 * 32 + 4 * 4 + 8 * 128 + 8 == 2456
    N = 32
    assert M.saved_activations(s, N, "fp32", False) == 2 * N * 4376 + 8 * 64 * N
    assert M.saved_activations(s, N, "fp32", True) == 2 * N * 64 * 4 + N * 4376 + 8 * 64 * N
    assert M.logit_loss(s, N, 512, "full", "fp32") == {"held": N * 64 * 4 + 4 * 384 * 64, "chunk": 5 * 4 * N * 384}
    divergence = 3 * 4 * 512 * 384                                   # top-k: 3 [n, V] fp32 buffers
    weight_grad = 4 * 512 * 384 + 4 * 384 * 64 + 2 * 512 * 384 + 4 * 384 * 64  # g, fp32 [V, C], bf16 copies
    assert M.logit_loss(s, 1024, 512, "topk", "autocast")["chunk"] == max(divergence, weight_grad) + 4 * 384 * 64
    assert M.autocast_cache(s) == 2 * s.linear_params
    assert M.optimizer_transient(s, 1, "none", cuda=True) == 0  # fused AdamW on one device / DDP
    assert M.optimizer_transient(s, 4, "fsdp", cuda=True) == 4 * P // 4  # foreach on shards
    assert M.optimizer_transient(s, 1, "none", cuda=False) == 8 * 384 * 64
    assert M.kv_cache(s, 8, 160, 2) == 2 * 2 * 32 * 2 * 8 * 160


def test_distill_estimate_of_tiny_llama_by_hand():
    s = M.shape_of(_tiny())
    P, N, C, V = s.params, 2 * 16, 64, 384
    ts = E.TrainSettings(batch_size=2, grad_accum=1, seq_len=16, mode="fp32", checkpointing=False, world=1,
                         parallel="none", chunk=512, teacher="full")
    est = E.train_estimate("distill", s, s, 4, ts, cuda=False)
    acts = 2 * N * 4376 + 8 * C * N
    end_of_forward = N * C * 4 + acts + (N * C * 4 + 4 * V * C) + 5 * 4 * N * V  # teacher states + acts + loss
    phases = {"end of forward": end_of_forward,
              "start of backward": N * C * 4 + acts + N * C * 4 + 4 * V * C + N * (2 * C * 4 + 3 * 128 * 4),
              "end of backward": 4 * P + 4 * V * C,            # grads + the tied embedding's dense gradient
              "optimizer step": 4 * P + 8 * V * C}
    assert max(phases, key=phases.get) == "end of forward"
    assert est.total == 4 * P + 8 * P + 4 * P + end_of_forward == 2234880  # master + AdamW + teacher + phase
    assert est.note.startswith("peak at end of forward")


def test_frozen_embeddings_leave_their_states_out_of_the_estimate(tmp_path):
    """distill.freeze_embeddings (auto: where the student keeps the teacher's hidden width) takes the embedding /
    LM head out of the gradients and AdamW states of the memory estimate and its weight gradient out of the FLOPs a
    distillation token costs in the budget estimate; a student whose hidden width was cut trains them."""
    from minitron.pipeline import budget as B

    _tiny().save_pretrained(tmp_path / "tiny")
    base = [f"model.teacher={tmp_path / 'tiny'}", "model.device=cpu", "data.seq_len=16", "distill.batch_size=2",
            "budget.minutes=10", "distill.freeze_embeddings=auto"]

    def distill(over):
        cfg = load_config(RunConfig, None, base + over)
        shapes = E.resolve_shapes(cfg)
        est = {e.stage: e for e in E.estimate_run(cfg)}["distill"]
        return est, shapes, B.distill_flops(cfg, shapes)

    kept, shapes, flops = distill(["target.ffn=64"])  # hidden 64 kept: frozen
    s, t = shapes["student"], shapes["teacher"]
    trained = s.params - 384 * 64
    assert kept.terms["AdamW states"] == 8 * trained and kept.terms["master weights"] == 4 * s.params
    assert flops == 6 * B._compute_params(s) + 2 * B._compute_params(t) - 2 * 384 * 64
    trained_all, _, flops_all = distill(["target.ffn=64", "distill.freeze_embeddings=false"])
    assert trained_all.terms["AdamW states"] == 8 * s.params and flops_all == flops + 2 * 384 * 64
    cut, cut_shapes, cut_flops = distill(["target.hidden=32"])  # hidden cut: auto trains them
    assert cut.terms["AdamW states"] == 8 * cut_shapes["student"].params
    assert cut_flops == 6 * B._compute_params(cut_shapes["student"]) + 2 * B._compute_params(t)


def test_release_teacher_takes_the_teacher_out_of_the_step():
    """With a top-k cache and release_teacher, the teacher's weights are resident only while the cache is built."""
    t = M.shape_of(make_config("llama", layers=8, intermediate_size=512))
    s = M.shape_of(_tiny())
    ts = dict(batch_size=2, grad_accum=1, seq_len=16, mode="fp32", checkpointing=False, world=1, parallel="none",
              chunk=512, teacher="topk")
    kept = E.train_estimate("distill", s, t, 4, E.TrainSettings(**ts), cuda=False)
    freed = E.train_estimate("distill", s, t, 4, E.TrainSettings(**ts, release_teacher=True), cuda=False)
    assert kept.terms["teacher weights"] == 4 * t.params
    assert freed.total < kept.total and freed.total >= 4 * t.params  # the cache build is the peak here
    assert freed.note.startswith("peak at top-k cache build")


def test_importance_stage_of_tiny_llama_by_hand(tmp_path):
    _tiny().save_pretrained(tmp_path / "tiny")
    cfg = load_config(RunConfig, None, [f"model.teacher={tmp_path / 'tiny'}", "model.device=cpu", "data.seq_len=16",
                                        "importance.batch_size=2", "target.ffn=64"])
    stages = {e.stage: e for e in E.estimate_run(cfg)}
    P, N, C, F = M.shape_of(_tiny()).params, 32, 64, 128
    layer = N * (3 * 4 * F + 2 * 4 * C + 12 * C)               # forward temporaries > hooks and BI temporaries
    assert stages["importance"].terms == {"weights": 4 * P, "layer temporaries": layer, "BI states": 2 * N * C * 4,
                                          "fp32 statistics": 12 * 2 * (64 + F + 2 * C)}
    assert stages["correction"].skipped and stages["search"].skipped
    assert [e.stage for e in E.estimate_run(cfg)] == list(E.STAGES)


def _saved_bytes(config, mode: str, seq: int = 24) -> int:
    """Bytes autograd saves for backward in the decoder of a model of `config` on 2 x seq tokens (unique
    storages; parameters and autocast's bf16 weight copies, told apart by shape, excluded: 2 x seq must not
    equal a width of the config)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 384, (2, seq), generator=torch.Generator().manual_seed(0))  # [2, seq]
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast")
    with ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(seen.values())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_layer_activations_equal_what_autograd_saves(family, mode):
    """Bytes saved for backward by one more decoder layer equal layer_activations x tokens (Qwen3: q/k norms)."""
    saved = _saved_bytes(make_config(family, layers=2), mode) - _saved_bytes(make_config(family, layers=1), mode)
    assert saved == 48 * M.layer_activations(M.shape_of(make_config(family, layers=2)), mode)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
def test_moe_layer_activations_equal_what_autograd_saves(family, mode):
    """The same for an MoE layer (hidden 40 and expert width 24, so C- and F-wide tensors differ): the routed
    pairs are always N x top_k, so the formula holds whatever the router picks, up to the experts-hit index
    tensors (a few bytes per layer)."""
    over = {"hidden_size": 40, ("intermediate_size" if family == "mixtral" else "moe_intermediate_size"): 24}
    saved = (_saved_bytes(make_config(family, layers=2, **over), mode, seq=26)
             - _saved_bytes(make_config(family, layers=1, **over), mode, seq=26))  # 52 tokens
    s = M.shape_of(make_config(family, layers=2, **over))
    assert s.experts == 4 and s.top_k == 2
    assert abs(saved - 52 * M.layer_activations(s, mode)) <= 0.01 * saved  # top-k renormalization: 12 B/token


@pytest.fixture
def llama8b(tmp_path):
    """A dir holding only Llama-3.1-8B's config.json (no weights: the estimate never reads any)."""
    d = tmp_path / "llama-3.1-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return str(d)


@pytest.mark.parametrize("recipe,world", [("gpu-8b.yaml", 1), ("gpu-8b-8gpu.yaml", 8)])
def test_8b_recipes_fit_80gb(recipe, world, llama8b):
    cfg = load_config(RunConfig, RECIPES / recipe, [f"model.teacher={llama8b}"])
    gpu = M.parse_memory("80GB")
    shapes = E.resolve_shapes(cfg)
    stages = E.estimate_run(cfg, world, gpu, shapes)
    assert shapes["teacher"].params == 8_030_261_248  # Llama-3.1-8B
    assert all(E.fits(e, gpu) for e in stages), E.format_table(stages, gpu)
    assert E.warnings_for(cfg, stages, world, gpu, shapes) == []
    assert {e.stage for e in stages if not e.skipped} >= {"importance", "prune", "distill", "eval"}
    assert next(e for e in stages if e.stage == "correction").skipped == (world == 1)

    big = load_config(RunConfig, RECIPES / recipe, [f"model.teacher={llama8b}", "distill.batch_size=64",
                                                    "distill.grad_checkpointing=false"])
    warns = E.warnings_for(big, E.estimate_run(big, world, gpu, shapes), world, gpu, shapes)
    assert len(warns) == 1 and "stage distill" in warns[0] and "fits with" in warns[0]
    assert "grad_checkpointing=true" in warns[0] or "batch_size=" in warns[0]


def test_one_gpu_cannot_hold_the_4b_student(llama8b):
    """The papers' 4.5B student with fp32 master weights + AdamW next to the bf16 teacher: over 80 GB on one
    GPU (the reason recipes/gpu-8b.yaml prunes to 2.9B), and the advice is FSDP."""
    cfg = load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}", "target.hidden=3072",
                                                           "target.ffn=9216"])
    gpu = M.parse_memory("80GB")
    shapes = E.resolve_shapes(cfg)
    warns = E.warnings_for(cfg, E.estimate_run(cfg, 1, gpu, shapes), 1, gpu, shapes)
    assert len(warns) == 1 and "stage distill" in warns[0] and "GPUs with FSDP" in warns[0]


def test_parse_memory():
    assert M.parse_memory("80GB") == M.parse_memory("80 GiB") == M.parse_memory("80G") == 80 * 2**30
    assert M.parse_memory("512MB") == 512 * 2**20 and M.parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="80GB"):
        M.parse_memory("eighty")


def test_cli_prints_the_table(llama8b, capsys):
    assert main(["plan", "--estimate", str(RECIPES / "gpu-8b.yaml"), f"model.teacher={llama8b}",
                 "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "| stage | peak per GPU | fits 80 GiB | main terms |" in out
    for stage in ("correction", "importance", "search", "prune", "distill", "eval"):
        assert f"| {stage} |" in out
    assert "Every stage fits 80 GiB" in out
    assert main(["plan", "--estimate", str(RECIPES / "gpu-8b.yaml"), f"model.teacher={llama8b}",
                 "distill.batch_size=64", "distill.grad_checkpointing=false", "--gpu-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "**NO**" in out and "WARNING: stage distill needs" in out


def test_dry_run_warns_before_a_stage(llama8b, capsys):
    cfg = load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}", "distill.batch_size=64"])
    warns = E.dry_run(cfg, "distill", world_size=1, memory="80GB")
    assert len(warns) == 1 and "stage distill" in capsys.readouterr().err
    assert E.dry_run(cfg, "importance", world_size=1, memory="80GB") == []
    bad = load_config(RunConfig, None, ["model.teacher=/no/such/model", "target.params=70M"])
    assert E.dry_run(bad, "distill", memory="80GB") == []  # never raises
    assert "memory estimate unavailable" in capsys.readouterr().err


def test_fsdp_accumulation_and_loading(llama8b):
    """FSDP with grad_accum > 1 holds every unsharded fp32 gradient (4P per GPU) until the step's one
    reduce-scatter, unless fsdp_reduce_every_micro; loading: rank 0's copy of the checkpoint in host RAM
    (P x its bytes), on each GPU the frozen teacher + its fp32 shard + one tensor in flight."""
    gpu = M.parse_memory("80GB")
    cfg = load_config(RunConfig, RECIPES / "gpu-8b-8gpu.yaml", [f"model.teacher={llama8b}"])
    shapes = E.resolve_shapes(cfg)
    S, T = shapes["student"], shapes["teacher"]
    est = {e.stage: e for e in E.estimate_run(cfg, 8, gpu, shapes)}
    assert est["distill"].terms["grads (unsharded fp32, accumulated)"] == 4 * S.params
    assert est["correction"].terms["grads (unsharded fp32, accumulated)"] == 4 * T.params
    sharded = load_config(RunConfig, RECIPES / "gpu-8b-8gpu.yaml", [f"model.teacher={llama8b}",
                                                                    "distill.fsdp_reduce_every_micro=true"])
    d2 = {e.stage: e for e in E.estimate_run(sharded, 8, gpu, shapes)}["distill"]
    assert not any("unsharded" in k for k in d2.terms) and d2.total < est["distill"].total - 3 * S.params
    d, c = est["distill"], est["correction"]
    assert d.host == 2 * S.params and c.host == 2 * T.params  # bf16 checkpoints, rank 0 only
    assert d.load == 2 * T.params + 4 * S.params // 8 + S.largest_tensor * (2 + 4) < d.total
    assert est["importance"].load == 2 * T.params and est["importance"].host == 0
    one = load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}"])
    d1 = {e.stage: e for e in E.estimate_run(one, 1, gpu)}["distill"]
    assert d1.host == 0 and d1.load == 2 * T.params + d1.terms["master weights"]  # fp32 student, one GPU
    assert "| distill |" in E.format_loading(list(est.values())) and E.format_loading(
        E.estimate_run(load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}",
                                                                       "model.device=cpu"]), 1)) == ""


def test_fsdp_on_one_gpu_under_torchrun(llama8b):
    """`distributed: fsdp` with one torchrun process runs FSDP2 over a world of 1 (distill.parallel), and the
    estimate follows: FSDP2's load and bf16 parameters under torchrun, one device's autocast without."""
    cfg = load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}", "distill.distributed=fsdp"])
    gpu = M.parse_memory("80GB")
    under = {e.stage: e for e in E.estimate_run(cfg, 1, gpu, torchrun=True)}["distill"]
    plain = {e.stage: e for e in E.estimate_run(cfg, 1, gpu, torchrun=False)}["distill"]
    assert under.load_note.startswith("FSDP") and under.host > 0 and "bf16 compute" in under.note
    assert not plain.load_note.startswith("FSDP") and plain.host == 0 and "autocast compute" in plain.note


def test_budget_in_gpu_hours_is_spent_as_flops_say(llama8b, capsys):
    """The 8-GPU recipe with a GPU-hour budget: the same budget logic as the CPU run (stages before distillation,
    both evaluations, then distillation gets the rest), its tokens from FLOPs at the assumed throughput."""
    from minitron.pipeline import budget as B

    cfg = load_config(RunConfig, RECIPES / "gpu-8b-8gpu.yaml", [f"model.teacher={llama8b}", "budget.gpu_hours=64"])
    shapes = E.resolve_shapes(cfg)
    lines = B.estimate_lines(cfg, shapes, 8, cuda=True)
    assert lines[0].startswith("Budget: 64 GPU-hours over 8 GPUs = 480.0 min of wall time")
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "minutes" not in line}
    assert {"importance", "teacher_eval", "eval", "distill"} <= set(rows)
    minutes = {k: float(v.split(" | ")[1].split()[0]) for k, v in rows.items()}
    assert sum(minutes.values()) == pytest.approx(480, abs=0.5)  # every minute is given to a stage
    t, s = B._compute_params(shapes["teacher"]), B._compute_params(shapes["student"])
    tok_s = 8 * B.GPU_TFLOPS * 1e12 / (6 * s + 2 * t)
    assert f"at {tok_s:,.0f} tokens/s" in rows["distill"]
    tokens = float(rows["distill"].split("~")[1].split("M")[0].replace(",", "")) * 1e6
    assert tokens == pytest.approx(minutes["distill"] * 60 * tok_s, rel=0.01)  # tokens = distillation time x rate
    assert main(["plan", "--estimate", str(RECIPES / "gpu-8b-8gpu.yaml"), f"model.teacher={llama8b}",
                 "budget.gpu_hours=64", "--world-size", "8", "--tflops", "300"]) == 0
    assert "at 300 TFLOP/s achieved per GPU" in capsys.readouterr().out
    assert B.estimate_lines(load_config(RunConfig, RECIPES / "gpu-8b-8gpu.yaml", [f"model.teacher={llama8b}"]),
                            shapes, 8, cuda=True) == []  # no budget, no plan


def test_autocast_auto_counts_as_bf16_on_a_gpu_only(llama8b):
    """distill.autocast=auto is bf16 on a GPU that has it (distill.precision.choose_autocast) and measured on a
    CPU: the estimate counts it as autocast on CUDA and fp32 on a CPU; an unknown value fails at load."""
    over = [f"model.teacher={llama8b}", "model.dtype=float32", "distill.autocast=auto"]
    gpu = {e.stage: e for e in E.estimate_run(load_config(RunConfig, RECIPES / "gpu-8b.yaml", over), 1,
                                              M.parse_memory("80GB"))}["distill"]
    cpu = {e.stage: e for e in E.estimate_run(load_config(RunConfig, RECIPES / "gpu-8b.yaml",
                                                          over + ["model.device=cpu"]), 1)}["distill"]
    assert "autocast compute" in gpu.note and "autocast compute" not in cpu.note
    with pytest.raises(ConfigError, match="distill.autocast 'fp16' unknown"):
        load_config(RunConfig, RECIPES / "gpu-8b.yaml", [f"model.teacher={llama8b}", "distill.autocast=fp16"])
