"""The memory terms of minitron.pipeline.estimate: a model's Shape (from its config on the meta device) and one function
per term, its bytes named in its docstring. Notation: P parameters, C hidden, A = heads x head_dim, K = KV heads
x head_dim, F MLP width (an MoE expert's width), H heads, L layers, V vocabulary, N tokens of one micro-batch on
one rank, n tokens of one loss chunk, W world size. Activations are what a decoder layer saves for backward,
counted op by op against autograd (tests/test_estimate.py)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from minitron.arch import adapters as arch

GiB = 1024**3
LOSS_CHUNK = 1024             # tokens per logit chunk of the forward-only LM loss (minitron.arch.models.LOSS_CHUNK)

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (float32 | bfloat16 | float16 and short forms)."""
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def parse_memory(text: str | int | float) -> int:
    """'80GB' | '80G' | '80GiB' | '141 GB' | '512MB' | bytes -> bytes. GPU makers' "GB" are binary (an 80 GB
    card has 80 GiB = 81920 MiB), so GB and GiB both mean 2**30 here."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 80GB, 141GB or 24GiB")
    return int(float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()))


# ---- shapes --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What memory depends on in one model: dims and exact parameter counts (from a meta-device build)."""

    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool
    params: int               # all parameters, a tied embedding counted once
    layer_params: int         # parameters of the largest decoder layer
    linear_params: int        # matmul weights (and biases) of all decoder layers: what autocast casts to bf16
    largest_tensor: int       # elements of the largest parameter tensor
    n_attn_in: int = 3        # projections reading the normed input of attention (q, k, v; 1 when fused)
    n_mlp_in: int = 2         # projections reading the normed input of the MLP (gate, up; 1 when fused)
    gated: bool = True        # act(gate) * up (False: Nemotron's relu^2 MLP)
    extra_norms: int = 0      # per-layer norms over the hidden axis beyond the two pre-norms (Gemma3: 2)
    head_norms: bool = False  # q_norm / k_norm over head_dim (Qwen3, Gemma3)
    experts: int = 0          # MoE: experts per layer (0: dense); ffn is then each expert's width
    top_k: int = 0            # MoE: experts each token runs through
    shared_ffn: int = 0       # MoE: the shared expert's width (0: none)

    @property
    def attn_width(self) -> int:  # A
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:  # K
        return self.kv_heads * self.head_dim

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, final norm, an untied LM head."""
        return self.params - self.layers * self.layer_params

    def describe(self) -> str:
        mlp = (f"{self.experts} experts of {self.ffn} ({self.top_k} per token"
               f"{f', shared {self.shared_ffn}' if self.shared_ffn else ''})" if self.experts else f"MLP {self.ffn}")
        return (f"{self.params / 1e9:.3g}B params: hidden {self.hidden}, {mlp}, {self.heads} heads / "
                f"{self.kv_heads} KV, head_dim {self.head_dim}, {self.layers} layers, vocab {self.vocab}"
                f"{', tied' if self.tied else ''}")


def shape_of(config) -> Shape:
    """The Shape of an HF config of a supported family (built on the meta device: no memory, no weights)."""
    import torch

    from minitron.arch.models import model_from_config

    a = arch.get_arch(config)
    d = arch.dims_of(config)
    with torch.device("meta"):
        model = model_from_config(config)
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    layers = arch.decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linear = sum(p.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
                 for p in m.parameters(recurse=False))
    # projections reading the MLP's normed input: MoE has the router, and a shared expert's gate, up and gate
    n_mlp_in = (1 + (3 if d.shared_ffn else 0)) if d.experts else len(a.mlp_in)
    return Shape(hidden=d.hidden, ffn=d.ffn, heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim,
                 layers=d.layers, vocab=d.vocab, tied=d.tied, params=sum(p.numel() for p in params),
                 layer_params=layer_params, linear_params=linear, largest_tensor=max(p.numel() for p in params),
                 n_attn_in=len(a.attn_in), n_mlp_in=n_mlp_in, gated=any(len(s) > 1 for _, s in a.mlp_in)
                 or len(a.mlp_in) > 1, extra_norms=len(a.other_hidden_norms), head_norms=bool(a.head_norms),
                 experts=d.experts, top_k=d.top_k, shared_ffn=d.shared_ffn)


def student_shape(config, dims: arch.Dims) -> Shape:
    """The Shape of `config` pruned to `dims` (every layer keeps the same widths)."""
    from minitron.prune.plan import config_with_dims

    return shape_of(config_with_dims(config, dims))


# ---- the terms: one function each, bytes ---------------------------------------------------------------

def weights(params: int, nbytes: int) -> int:
    """P x bytes per parameter: a model held in one dtype (fp32 4, bf16 2)."""
    return params * nbytes


def frozen_embedding_params(s: Shape) -> int:
    """Parameters of the token embedding and the LM head (one tensor where tied): what distill.freeze_embeddings
    leaves without gradient and AdamW state."""
    return s.vocab * s.hidden * (1 if s.tied else 2)


def master_states(s: Shape, world: int, mode: str, frozen: int = 0) -> dict[str, int]:
    """The trained model's fp32 state: master weights 4P, gradients 4P', AdamW exp_avg and exp_avg_sq 8P', with P'
    the P - frozen parameters that train; divided by W under FSDP (sharded), whole on every rank otherwise; DDP adds
    its fp32 gradient buckets (4P': gradient_as_bucket_view is off)."""
    shard = world if mode == "fsdp" else 1
    trained = s.params - frozen
    out = {"master weights": 4 * s.params // shard, "grads": 4 * trained // shard,
           "AdamW states": 8 * trained // shard}
    if mode == "ddp":
        out["DDP buckets"] = 4 * trained
    return out


def fsdp_accumulated_grads(s: Shape, frozen: int = 0) -> int:
    """FSDP2 with gradient accumulation and no reduce-scatter between micro-batches (set_requires_gradient_sync):
    every trained parameter's unsharded gradient, accumulated in the reduce dtype (fp32), lives on every rank until
    the last micro-batch's backward reduce-scatters it: 4 (P - frozen)."""
    return 4 * (s.params - frozen)


def sharded_load(s: Shape, file_bytes: int, world: int) -> int:
    """FSDP2 load (distill.parallel.fill_shards): this rank's fp32 shards, 4P / W, plus one full tensor in flight
    from rank 0 (the broadcast buffer in the checkpoint's dtype and its fp32 shard copy): largest x (bytes + 4)."""
    return 4 * s.params // world + s.largest_tensor * (file_bytes + 4)


def optimizer_transient(s: Shape, world: int, mode: str, cuda: bool) -> int:
    """AdamW.step temporaries: on CUDA under FSDP (foreach) sqrt(exp_avg_sq) for every parameter shard at once,
    4P / W; on CUDA otherwise none (distill uses the fused kernel); on CPU (one tensor at a time) sqrt and its
    quotient for the largest tensor, 8 x its elements (/ W under FSDP: shards)."""
    shard = world if mode == "fsdp" else 1
    if cuda:
        return 4 * s.params // shard if mode == "fsdp" else 0
    return 8 * s.largest_tensor // shard


def autocast_cache(s: Shape) -> int:
    """torch.autocast keeps a bf16 copy of every fp32 weight a matmul used until the autocast region ends
    (after backward): 2 x the decoder layers' linear parameters. The LM head's copy is made per loss chunk
    (logit_loss). Not under FSDP, whose gathered parameters are bf16 already."""
    return 2 * s.linear_params


def fsdp_gathered(s: Shape, nbytes: int) -> int:
    """FSDP2: the root's parameters (embedding, final norm, an untied LM head) stay gathered in the compute
    dtype (param_dtype: bf16 2, else fp32 4 bytes) through forward and backward, and two decoder layers are
    gathered at a time (the running one and the prefetched one): bytes x (root params + 2 x layer params)."""
    return nbytes * (s.root_params + 2 * s.layer_params)


def fsdp_reduce(s: Shape, nbytes: int) -> int:
    """FSDP2 backward of one layer: its unsharded gradients in the compute dtype and, when that is bf16, their
    fp32 copy for the reduce-scatter (reduce_dtype fp32): (bytes + 4) or 4 x layer params."""
    return (nbytes + 4 if nbytes < 4 else 4) * s.layer_params


def layer_activations(s: Shape, mode: str) -> int:
    """Bytes per token one decoder layer saves for backward (counted op by op with saved-tensor hooks on
    Llama layers in transformers 5, fp32 / autocast bf16 / bf16 parameters):
      fp32:     24C + 8A + 8K + 4H + 16F + 8  (each pre-norm saves its input, the normalized x and the
                                                weighted output that q/k/v or gate/up read: 3 x 4C)
      autocast: 26C + 4A + 4K + 4H + 8F + 8   (the residual stream stays fp32; each norm saves 8C and each
                                                of the 5 projections its own bf16 copy of the input, 2C)
      bf16:     16C + 4A + 4K + 4H + 8F + 8   (FSDP's bf16 parameters: norms upcast to fp32 inside)
    attention: q and k after RoPE, v, the attention output (= o_proj's input), fp32 log-sum-exp per head;
    MLP: gate, act(gate), up, their product (= down_proj's input); each norm's fp32 1/rms, 4 bytes. Families
    with extra norms add 8C + 4 per norm; q_norm/k_norm add 8(A + K) (16-bit: 6(A + K)) + 4 per head; an ungated MLP saves 3 instead of 4 F-wide tensors."""
    C, A, K, F, H = s.hidden, s.attn_width, s.kv_width, s.ffn, s.heads
    c = 4 if mode == "fp32" else 2
    norms = {"fp32": 24 * C, "autocast": 16 * C + 2 * C * (s.n_attn_in + s.n_mlp_in), "bf16": 16 * C}[mode]
    norms += 8 * C * s.extra_norms + 4 * (2 + s.extra_norms)  # + each norm's fp32 rsqrt
    if s.head_norms:  # q_norm / k_norm: input and normalized x (fp32: 8 bytes, 16-bit: 6) and an rsqrt per head
        norms += (8 if mode == "fp32" else 6) * (A + K) + 4 * (H + s.kv_heads)
    attn = c * (2 * A + 2 * K) + 4 * H
    mlp = moe_activations(s, mode) if s.experts else (4 if s.gated else 3) * c * F
    return norms + attn + mlp


def moe_activations(s: Shape, mode: str) -> int:
    """Bytes per token an MoE block saves for backward (transformers 5's experts loop, counted with
    saved-tensor hooks): per routed (token, expert) pair the gathered input and the expert's output before
    the routing weight (2 x C), its gate_up output, act(gate) and their product (4 x F), the routing weight
    and int64 token / slot indices (28 bytes); per token the router's fp32 probabilities (4E), the top-k
    indices and weights (12 x top_k + 4). The experts run in the parameter dtype even under autocast (their
    3-D weights are not autocast-enabled: transformers casts the input to the weight's dtype), so fp32 master
    weights mean fp32 expert activations. A shared expert saves a dense gated MLP's 4 x Fs plus its output
    and sigmoid gate (C + 2 values)."""
    C, F = s.hidden, s.ffn
    e = 2 if mode == "bf16" else 4  # bytes of the parameter dtype
    c = 4 if mode == "fp32" else 2  # bytes of autocast's compute dtype
    out = s.top_k * (e * (2 * C + 4 * F) + 28) + 4 * s.experts + 12 * s.top_k + 4
    if s.shared_ffn:
        out += 4 * c * s.shared_ffn + c * (C + 2)
    return out


def residual_bytes(mode: str) -> int:
    """Bytes per element of the residual stream: fp32 unless the parameters themselves are bf16 (FSDP)."""
    return 2 if mode == "bf16" else 4


def saved_activations(s: Shape, tokens: int, mode: str, checkpointing: bool) -> int:
    """Activations alive at the end of the student's forward: L x N x layer_activations, plus the final norm
    (8C per token); with activation checkpointing each layer keeps only its input (N x C x residual bytes)
    and one layer at a time is recomputed in backward (N x layer_activations)."""
    per_layer = layer_activations(s, mode)
    final_norm = 8 * s.hidden * tokens
    if checkpointing:
        return s.layers * tokens * s.hidden * residual_bytes(mode) + tokens * per_layer + final_norm
    return s.layers * tokens * per_layer + final_norm


def backward_working(s: Shape, tokens: int, mode: str) -> int:
    """Gradient buffers while one layer runs backward: the incoming and outgoing gradients of the residual
    stream (2 x N x C x residual bytes) and three F-wide gradients (N x 3F x compute bytes); under autocast
    also the bf16 weight gradient of the largest matmul and its fp32 cast (6 x F x C)."""
    c = 4 if mode == "fp32" else 2
    ffn = s.top_k * s.ffn + s.shared_ffn if s.experts else s.ffn  # MoE: the F-wide gradients of every route
    out = tokens * (2 * s.hidden * residual_bytes(mode) + 3 * ffn * c)
    if mode == "autocast":
        out += 6 * s.ffn * s.hidden
    return out


def logit_loss(s: Shape, tokens: int, chunk: int, teacher: str, mode: str) -> dict[str, int]:
    """The chunked logit loss (minitron.distill.losses, gradients made in the forward pass chunk by chunk):
      held:  the gradient of the final hidden states N x C (residual bytes) and of the LM head V x C (fp32),
             alive from the forward to the start of backward;
      chunk: the larger of the divergence phase, k x n x V fp32 (k = 5 with a live teacher: both logits,
             both log-probs, the teacher's probs; 3 with a top-k cache; 2 for the LM loss alone), and the
             weight-gradient phase: the logit gradient n x V fp32, the fp32 [V, C] product, and under bf16
             compute the bf16 copies of the logit gradient and of the head weight and the bf16 product
             (2nV + 4VC); plus the accumulated head gradient (4VC) once there is more than one chunk."""
    n = min(chunk, tokens)
    V, C = s.vocab, s.hidden
    k = {"full": 5, "topk": 3, "none": 2}[teacher]
    weight_grad = 4 * n * V + 4 * V * C + (2 * n * V + 4 * V * C if mode != "fp32" else 0)
    accumulated = 4 * V * C if tokens > chunk else 0
    return {"held": tokens * C * residual_bytes(mode) + 4 * V * C,
            "chunk": max(k * 4 * n * V, weight_grad) + accumulated}


def forward_working(s: Shape, tokens: int, nbytes: int) -> int:
    """One decoder layer's temporaries in a forward pass without autograd: act(gate), up and their product
    (3 x N x F), the layer input and the normed input (2 x N x C) in the model dtype, and the norm's fp32
    upcast temporaries (12 x N x C)."""
    return tokens * (3 * nbytes * s.ffn + 2 * nbytes * s.hidden + 12 * s.hidden)


def lm_scoring(s: Shape, tokens: int, nbytes: int, chunk: int = LOSS_CHUNK) -> int:
    """The forward-only LM loss (minitron.arch.models.token_nll_sum) of N tokens: the final hidden states and
    their copy at the valid positions (2 x N x C, model dtype), then the larger of one layer's forward
    temporaries and one chunk of logits in the model dtype, their fp32 copy and the fp32 log-softmax
    (n x V x (bytes + 8))."""
    n = min(chunk, tokens)
    return 2 * tokens * s.hidden * nbytes + max(forward_working(s, tokens, nbytes), n * s.vocab * (nbytes + 8))


def importance_working(s: Shape, tokens: int, nbytes: int, bi_states: int) -> dict[str, int]:
    """The activation-importance pass (minitron.prune.importance) on N calibration tokens, backbone only (no
    logits):
      hooks:  at the hooked down_proj / o_proj input (model dtype, N x F) the fp32 copy, |x| and the masked
              product that seq_aggregate makes: 3 x 4 bytes per element (2 x 4 when the model is fp32, whose
              .float() is free);
      layer:  one layer's forward temporaries (forward_working), whichever is larger;
      BI:     the unit-normalized states of the last `bi_states` depths held in the model dtype (N x C each)
              plus the fp32 temporaries of one normalization and cosine (12 x N x C);
      stats:  per-channel fp32 sum, sum of squares and max of every hooked axis, 12 x L x (A + F + 2C)."""
    F = max(s.ffn, s.attn_width)
    hooks = tokens * (nbytes * F + (12 if nbytes < 4 else 8) * F + 2 * nbytes * s.hidden)
    bi = bi_states * tokens * s.hidden * nbytes
    return {"layer temporaries": max(hooks, forward_working(s, tokens, nbytes), 12 * tokens * s.hidden),
            "BI states": bi,
            "fp32 statistics": 12 * s.layers * (s.attn_width + s.ffn + 2 * s.hidden)}


def kv_cache(s: Shape, batch: int, tokens: int, nbytes: int) -> int:
    """Keys and values of every layer for batch x tokens positions: 2 x L x K x bytes per position."""
    return 2 * s.layers * s.kv_width * nbytes * batch * tokens


def refit_working(t: Shape, s: Shape, tokens: int, batch_tokens: int, nbytes: int) -> dict[str, int]:
    """The prune stage's refit (minitron.prune.refit) over N calibration tokens, beside the teacher: the student
    (its own copy), the teacher's and the student's residual streams and the teacher's stream after attention
    (N x (C_t + 2 C_s)), the student's MLP inputs and residual before the MLP kept for one layer (N x (F + C_s)),
    in the model dtype; X^T X and X^T R in fp32 and their fp64 solve (k = the wider of F and H x D); one layer's
    forward temporaries."""
    k = max(s.ffn, s.heads * s.head_dim)
    return {"refit: student copy": weights(s.params, nbytes),
            "refit: streams": tokens * (t.hidden + 2 * s.hidden) * nbytes,
            "refit: one layer's MLP inputs": tokens * (s.ffn + s.hidden) * nbytes,
            "refit: statistics and solve": 4 * k * (k + s.hidden) + 8 * k * (2 * k + s.hidden),
            "refit: layer temporaries": forward_working(s, batch_tokens, nbytes)}
