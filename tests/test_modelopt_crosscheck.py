"""Our importance scores equal NVIDIA ModelOpt's L2NormHook on the same tokens (pip install 'minitron[crosscheck]')."""

import pytest
import torch

from conftest import make_model, make_text
from minitron import arch
from minitron.data import pack
from minitron.prune.importance import ImportanceConfig, compute_importance

hooks = pytest.importorskip("modelopt.torch.prune.importance_hooks", reason="nvidia-modelopt not installed")


def test_scores_match_modelopt_l2normhook(tokenizer):
    model = make_model("qwen3")
    blocks = pack([make_text(300, seed=5)], tokenizer, 32)[:12]  # [12, 32]
    ours = compute_importance(model, blocks, ImportanceConfig(batch_size=4))

    attn, mlp, norms, handles = [], [], [], []

    def attach(module, use_output, store):
        hook = hooks.L2NormHook()
        store.append(hook)

        def fn(mod, args, out):  # Megatron layout: [seq, batch, hidden]
            x = out if use_output else args[0]
            hook(mod, (x.transpose(0, 1),), out)
        handles.append(module.register_forward_hook(fn))

    for layer in arch.decoder_layers(model):
        attach(arch.attn_output(model, layer), False, attn)
        attach(arch.mlp_output(model, layer), False, mlp)
        for norm in arch.channel_norms(model, layer):
            attach(norm, True, norms)
    with torch.no_grad():
        for i in range(0, len(blocks), 4):
            model(blocks[i:i + 4], use_cache=False)
    for h in handles:
        h.remove()
    d = arch.dims_of(model.config)
    heads = torch.stack([h.accumulate().view(d.heads, d.head_dim).norm(dim=-1) for h in attn])  # [L, H]
    assert torch.allclose(ours["heads"], heads, rtol=1e-5)
    assert torch.allclose(ours["neurons"], torch.stack([h.accumulate() for h in mlp]), rtol=1e-5)
    assert torch.allclose(ours["channels"], torch.stack([h.accumulate() for h in norms]).sum(0), rtol=1e-5)
