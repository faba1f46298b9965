"""Architecture facts: one adapter per family kind (adapters: module paths, GQA, biases, norms, config keys, the
slicing helpers every trim uses), MoE (moe) and Mamba (mamba) specifics, loading models and tokenizers (models, the
GGUF teacher's tokenizer: gguf_tokenizer), atomic files (files), torchrun ranks and the collective audit (ranks,
audit), the run log every `minitron run` appends to (runlog), tiny random models for tests (tiny). The bottom layer: imports nothing else of minitron.

`from minitron import arch; arch.get_arch(model)`: the adapters' names are this package's.
"""

from minitron.arch.adapters import *  # noqa: F403
