"""The `llmpress` command line: compress, eval, report, inspect, export, fetch-demo.

Errors the user can fix print one clear message and exit with status 2. Nothing heavy (torch,
transformers) is imported until a command runs, so help and argument errors are immediate.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from .errors import LlmpressError

logger = logging.getLogger("compress")


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress a model following a recipe and save a checkpoint", formatter_class=_Formatter)
    p.add_argument("model", help="hub id, local HF directory, or .gguf file")
    p.add_argument("--recipe", help="recipe YAML (see recipes/); default: W4, INT4 groups of 16 with GPTQ-style "
                   "error feedback (recipes/w4-g16.yaml)")
    p.add_argument("--max-size", metavar="SIZE", help="compress to this whole-model size as served (e.g. 8GB, 250MB, "
                   "7.5GiB): one knapsack across methods, the auto recipe unless --recipe has a knapsack allocation")
    p.add_argument("--dataset", help="calibration data: .txt/.jsonl/.parquet file or HF dataset id (default: built-in)")
    p.add_argument("--num-samples", type=int, help="calibration windows (overrides the recipe)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration window (overrides the recipe)")
    p.add_argument("--device", help="where blocks are computed (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 when --device is cpu, bf16 on a GPU)")
    p.add_argument("--output-dir", help="checkpoint directory (default: out/<model>-<recipe>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field by dotted path, e.g. stages.0.ratio=0.3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--resume", action="store_true", help="continue a killed run of the same command from its last "
                   "finished block (progress is kept beside the output directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-layer log")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and lm-eval tasks of a dense or compressed model", formatter_class=_Formatter)
    p.add_argument("model", help="llmpress checkpoint, HF directory, .gguf file or hub id")
    p.add_argument("--ppl", help="text file (or 'wikitext2' when online) for token-level perplexity")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. local_arc_easy,local_piqa")
    p.add_argument("--include-path", action="append", default=[], help="folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, help="examples per task (an int) or a fraction")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per lm-eval task (default: the task's own)")
    p.add_argument("--baseline", help="also evaluate this (dense) model and show both")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per perplexity window")
    p.add_argument("--max-windows", type=int, help="perplexity on the first N windows only (quick runs)")
    p.add_argument("--bos", choices=["auto", "yes", "no"], default="auto",
                   help="start each perplexity window with BOS: auto = when the tokenizer adds one (Gemma, Llama-3); "
                   "no = the GPTQ-style protocol")
    p.add_argument("--batch-size", type=int, default=1, help="windows (perplexity) or requests (lm-eval) per forward")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on a GPU)")
    p.add_argument("--json", help="write the results to this JSON file (default for an llmpress checkpoint: DIR/eval.json, "
                   "which llmpress report reads)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one table and plots across several compressed checkpoints", formatter_class=_Formatter)
    p.add_argument("runs", nargs="+", help="checkpoint directories (each with report.json, optionally eval.json)")
    p.add_argument("--output-dir", default="report", help="where report.md and the PNG plots go")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a compressed checkpoint as an ordinary dense HF checkpoint", formatter_class=_Formatter)
    p.add_argument("directory", help="llmpress checkpoint")
    p.add_argument("output_dir", help="where the dense HF checkpoint is written")
    p.add_argument("--format", choices=["dense"], default="dense", help="dense: reconstructed nn.Linear weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at output_dir")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="per-layer formats and true sizes of a compressed checkpoint", formatter_class=_Formatter)
    p.add_argument("directory", help="llmpress checkpoint")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch-demo", help="download the offline demo model (SmolLM2-135M-Instruct GGUF)", formatter_class=_Formatter)
    p.add_argument("directory", nargs="?", default="models", help="where the .gguf file is put")


# kept in step with compress.compressors.COMPRESSORS by the test suite (listing them here keeps
# `llmpress --help` from importing torch)
METHODS = ("cospadi", "eora", "fwsvd", "gptq", "gqsa", "magnitude", "mfac", "rocket", "sparsegpt", "svd", "wanda", "whitened_svd")

EXAMPLES = """examples:
  llmpress fetch-demo models
  llmpress compress models/SmolLM2-135M-Instruct.Q4_1.gguf --output-dir out/w4        # default recipe: W4
  llmpress compress models/SmolLM2-135M-Instruct.Q4_1.gguf --max-size 120MB --output-dir out/120mb
  llmpress compress HuggingFaceTB/SmolLM2-135M --recipe recipes/sparsegpt-50.yaml --set stages.0.pattern=2:4
  llmpress eval out/w4 --ppl test.txt --max-windows 8 --baseline models/SmolLM2-135M-Instruct.Q4_1.gguf
  llmpress inspect out/w4

methods: {methods}
recipes: {recipes}
"""


def _shipped_recipes() -> str:
    folder = Path(__file__).resolve().parents[1] / "recipes"
    names = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    return f"{', '.join(names)} (in {folder})" if names else "see the project's recipes/ folder"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one (not None, False or an empty list); examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += f" (default: {default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmpress",
        description="Compress Hugging Face causal LMs after training (low-rank, sparse dictionaries, pruning, "
        "group quantization) and serve them with Triton kernels.",
        epilog=EXAMPLES.format(methods=", ".join(METHODS), recipes=_shipped_recipes()),
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_inspect(sub)
    _add_export(sub)
    _add_fetch(sub)
    return parser


def _default_output_dir(model: str, recipe_name: str) -> Path:
    stem = Path(model).stem if Path(model).exists() else model.replace("/", "--")
    return Path("out") / f"{stem}-{recipe_name}"


def cmd_compress(args) -> int:
    from .paths import check_output_dir, local_dataset_path, resolve_model_source

    # what needs no torch is checked first: a missing file fails in well under a second
    if args.recipe and not Path(args.recipe).is_file():
        raise LlmpressError(f"recipe file {args.recipe!r} not found; examples live in recipes/ (e.g. recipes/w4-g16.yaml)")
    resolve_model_source(args.model)
    if args.dataset:
        local_dataset_path(args.dataset)
    if args.output_dir:
        check_output_dir(Path(args.output_dir), args.overwrite)

    from tqdm.contrib.logging import logging_redirect_tqdm

    from .api import compress_model
    from .checkpoint import save_compressed
    from .distributed import init_from_env, shutdown
    from .model_loading import check_device, load_model, load_tokenizer, resolve_dtype
    from .progress import progress_dir
    from .recipe import DEFAULT_RECIPE, auto_recipe, load_recipe, with_calibration, with_max_size
    from .report import high_error_layers, model_size, report_markdown

    if args.max_size:
        recipe = with_max_size(load_recipe(args.recipe if args.recipe else auto_recipe(max_size=args.max_size), args.overrides), args.max_size)
    else:
        recipe = load_recipe(args.recipe if args.recipe else DEFAULT_RECIPE, args.overrides)
    recipe = with_calibration(recipe, num_samples=args.num_samples, seq_len=args.seq_len, dataset=args.dataset)
    if recipe.calibration.dataset is not None:
        local_dataset_path(recipe.calibration.dataset)  # a missing calibration file named by the recipe
    device = check_device(args.device)
    output_dir = Path(args.output_dir) if args.output_dir else _default_output_dir(args.model, recipe.name)
    check_output_dir(output_dir, args.overwrite)
    # under torchrun: join the ranks (distributed.py); rank 0 alone logs, saves and prints
    parallel, device = init_from_env(device)
    if not parallel.is_main:
        logging.getLogger("compress").setLevel(logging.WARNING)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=resolve_dtype(args.dtype, device), device="cpu")
    check_output_dir(output_dir, args.overwrite, required_bytes=model_size(model)["bytes"])  # room for a checkpoint
    try:
        with logging_redirect_tqdm():
            model, report = compress_model(
                model, recipe, tokenizer=tokenizer, device=device, progress=not args.quiet,
                progress_to=progress_dir(output_dir), resume=args.resume,
            )  # fmt: skip
        report["model"] = args.model
        if parallel.is_main:
            save_compressed(model, output_dir, tokenizer=tokenizer, recipe=recipe, report=report, overwrite=args.overwrite)
        parallel.barrier()  # every rank's progress stays until the checkpoint is complete
        if parallel.is_main:
            shutil.rmtree(progress_dir(output_dir), ignore_errors=True)  # complete: nothing to resume (all ranks' folders)
    finally:
        shutdown()
    if not parallel.is_main:
        return 0
    summary = report["summary"]
    print(report_markdown(report).split("\n| layer")[0].rstrip())
    for warning in high_error_layers(report):
        print(f"llmpress: warning: {warning}", file=sys.stderr)
    left = report.get("not_compressed")
    if left:
        print(
            f"llmpress: warning: {left['parameters']:,} parameters ({100 * left['share_of_block_parameters']:.0f}% of the "
            f"decoder blocks) are 3-D weights in a layout llmpress does not know ({', '.join(left['names'])}): they were "
            "left as they are; only nn.Linear layers and transformers' experts modules are compressed",
            file=sys.stderr,
        )
    experts = report.get("experts")
    if experts and experts["layers_with_fewer_tokens_than_inputs"]:
        print(
            f"llmpress: note: {experts['layers_with_fewer_tokens_than_inputs']} of {experts['compressed_expert_layers']} "
            f"expert layers saw fewer calibration tokens than their input width ({len(experts['layers_without_tokens'])} "
            "saw none); their statistics were shrunk towards the identity. More samples, or --set calibration.moe=all, "
            "calibrate them on real data",
            file=sys.stderr,
        )
    size = report["model_size"]
    before, after = size["dense"]["bytes"], size["compressed"]["bytes"]
    print(
        f"\n{recipe.name}: {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB as served in {report['serve_dtype']} "
        f"({100 * (1 - after / before):.1f}% smaller, embeddings included; checkpoint {size['stored']['bytes'] / 2**20:,.1f} "
        f"MiB in {report['dtype']}); saved {output_dir} ({summary['layers']} layers, report {output_dir / 'report.md'})\n"
        f"next: llmpress eval {output_dir} --ppl TEXT_FILE   (perplexity; add --baseline {args.model} to compare)"
    )
    return 0


def _evaluate_one(args, source: str) -> dict:
    """Evaluate one model. On CPU, compressed layers whose PyTorch path expands the weight (sparse,
    tile-sparse, GQSA, dictionary coefficients) keep the expansion in the bounded CPU cache
    (`LLMPRESS_CPU_WEIGHT_CACHE`) instead of rebuilding it per call; the bytes it held are recorded
    in the results (memory beyond the compressed model's own)."""
    from .kernels import cpu_cache_bytes, cpu_cache_limit
    from .model_loading import check_device, load_model, load_tokenizer

    device = check_device(args.device)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=args.dtype, device=device)
    result: dict = {"model": source}
    _evaluate_loaded(args, source, model, tokenizer, result)
    if device == "cpu":
        result["cpu_expanded_weight_cache"] = {"bytes": cpu_cache_bytes(model), "limit_bytes": cpu_cache_limit()}
    return result


def _evaluate_loaded(args, source: str, model, tokenizer, result: dict) -> None:
    from compress.eval import evaluate, perplexity

    if args.ppl:
        ppl = perplexity(
            model, tokenizer, Path(args.ppl) if Path(args.ppl).exists() else args.ppl,
            seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size, progress=not args.quiet,
            bos={"auto": None, "yes": True, "no": False}[args.bos],
        )  # fmt: skip
        print(
            f"perplexity {ppl.perplexity:.4f}  ({ppl.windows} windows x {ppl.seq_len} tokens, "
            f"{ppl.tokens} predicted tokens, {'BOS first, ' if ppl.bos else ''}{ppl.seconds:.1f}s)  model {source}  text {args.ppl}"
        )
        result["perplexity"] = ppl.as_dict()
    if args.tasks:
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        harness = evaluate(
            model, tasks, tokenizer=tokenizer, include_path=args.include_path or None, limit=limit,
            batch_size=args.batch_size, num_fewshot=args.num_fewshot,
        )  # fmt: skip
        result.update({k: v for k, v in harness.items() if k != "model"})


def cmd_eval(args) -> int:

    from .paths import resolve_model_source

    if not args.ppl and not args.tasks:
        raise LlmpressError("nothing to evaluate: pass --ppl TEXT and/or --tasks a,b,...")
    for source in filter(None, (args.model, args.baseline)):
        resolve_model_source(source)  # before the heavy imports
    if args.ppl and args.ppl not in ("wikitext2", "wikitext-2") and not Path(args.ppl).is_file():
        raise LlmpressError(f"perplexity text {args.ppl!r} not found: pass a text file or 'wikitext2'")
    results = [_evaluate_one(args, args.model)]
    if args.baseline:
        results.append(_evaluate_one(args, args.baseline))
    if args.tasks:
        from compress.eval import results_table

        print(results_table([r for r in results if "tasks" in r]))
    from .checkpoint_check import is_llmpress_checkpoint

    target = args.json
    if target is None and is_llmpress_checkpoint(args.model):  # `llmpress report DIR` finds it there
        target = str(Path(args.model) / "eval.json")
    if target:
        payload = results[0] if len(results) == 1 else {"model": results[0], "baseline": results[1]}
        try:
            Path(target).write_text(json.dumps(payload, indent=2))
        except OSError as exc:
            if args.json:
                raise LlmpressError(f"cannot write {target}: {exc}") from None
            return 0  # a read-only checkpoint: the results were printed
        print(f"wrote {target}")
    return 0


def cmd_report(args) -> int:
    from .runs_report import write_runs_report

    path = write_runs_report(args.runs, args.output_dir)
    print(path.read_text())
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    print(f"wrote {path}" + (f" and plots {', '.join(plots)} in {path.parent}" if plots else " (no plots: nothing evaluated)"))
    return 0


def cmd_export(args) -> int:
    from .checkpoint import export_dense

    out = export_dense(args.directory, args.output_dir, overwrite=args.overwrite)
    print(f"wrote dense HF checkpoint {out}")
    return 0


def cmd_inspect(args) -> int:
    from .inspect_checkpoint import inspect_checkpoint, inspect_table

    info = inspect_checkpoint(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(inspect_table(info))
    from .kernels import serving_notes

    print("kernels (decode, this machine):")
    for line in serving_notes({r["format"] for r in info["modules"]}):
        print(f"  {line}")
    return 0


def cmd_fetch(args) -> int:
    from .demo_model import fetch_demo_model

    print(fetch_demo_model(args.directory))
    return 0


COMMANDS = {
    "compress": cmd_compress,
    "eval": cmd_eval,
    "report": cmd_report,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "fetch-demo": cmd_fetch,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("compress").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except LlmpressError as exc:
        print(f"llmpress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
