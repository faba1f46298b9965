"""Export: GGUF files for llama.cpp (gguf: `export_gguf`; families, tensors, hparams, ssm: what each family's
tensors and metadata are), and running them under llama.cpp (runtime). The Hugging Face dir and its model card are
written by minitron.eval.report and save_pretrained. Layer: a stage; imports minitron.prune (a model's config),
minitron.data and minitron.arch.
"""

from minitron.export.gguf import export_gguf, gguf_file_name  # noqa: F401
