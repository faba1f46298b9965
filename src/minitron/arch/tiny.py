"""Tiny random models (every supported family, hidden 64, 4 heads / 2 KV heads; MoE: 4 experts of width 32,
top-2) and a tiny trained tokenizer, built in code: for the test suite and the smoke preset of
benchmarks/ablations.py."""

from __future__ import annotations

import random

import torch

_WORDS = ("the model prunes heads and neurons while a teacher distills knowledge into a student that "
          "keeps most of its accuracy with fewer layers channels parameters tokens data loss small fast "
          "python code runs on cpu and gpu for every family of transformer decoder attention mlp norm").split()


def make_text(n_sentences: int = 400, seed: int = 0) -> str:
    """Deterministic pseudo-English: enough structure for a tokenizer and for importance scores."""
    rng = random.Random(seed)
    sents = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sents.append(" ".join(words).capitalize() + ".")
    return "\n".join(" ".join(sents[i:i + 5]) for i in range(0, len(sents), 5))


def make_tokenizer():
    """A byte-level BPE tokenizer (vocab 384) trained on make_text(), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(2000, seed=s) for s in range(3)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def make_config(family: str, vocab: int = 384, layers: int = 4, **over):
    """A tiny config of a family: hidden 64, 4 query heads / 2 KV heads of dim 16, MLP 128."""
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              tie_word_embeddings=family in ("qwen2", "qwen3"), eos_token_id=0, pad_token_id=0,
              bos_token_id=None)
    if family == "llama":
        kw.update(attention_bias=False)
    if family in ("gemma3_text", "gemma2"):  # alternating sliding / full attention, tied, scaled embeddings
        kw.update(query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2))
    if family == "gemma2":  # soft-caps low enough to bend the tiny model's logits and attention scores
        kw.update(final_logit_softcapping=3.0, attn_logit_softcapping=5.0)
    if family == "granite":  # every multiplier away from 1
        kw.update(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0)
    if family in MOE_FAMILIES:  # 4 experts of width 32, 2 per token (the key names differ per family)
        width = "intermediate_size" if family in ("mixtral", "olmoe") else "moe_intermediate_size"
        kw.update({width: 32, "num_experts_per_tok": 2,
                   ("num_local_experts" if family == "mixtral" else "num_experts"): 4})
        if family == "qwen2_moe":
            kw.update(shared_expert_intermediate_size=48)
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


def make_model(family: str, seed: int = 0, **over):
    """A tiny random model in eval mode, with non-trivial norm weights so channel scores differ (and, in MoE
    families, experts and router weights large enough that the experts and the routing matter)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family, **over), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            elif p.ndim == 3:  # fused MoE experts [E, 2F, C] / [E, C, F]: outputs that matter next to attention
                p.normal_(0.0, 0.1)
            elif name.endswith("mlp.gate.weight"):  # MoE router [E, C]: routing that depends on the token
                p.normal_(0.0, 0.3)
    return model.eval()
