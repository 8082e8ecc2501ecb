"""The `iropt` command line.

Exit codes: 0 success, 1 verification failed (or a pass crashed), 2 bad input. Bad input gets a
one-paragraph message and no traceback; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from iropt.errors import IroptError, UserError, VerificationError
from iropt.util.interrupt import raise_if_interrupted

Handler = Callable[[argparse.Namespace], int]
# 128 + SIGINT, as shells report a command stopped with Ctrl-C.
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `iropt` console script."""
    from iropt.app.streams import pipe_safe_output

    logger = logging.getLogger(_LOGGER)
    level = logger.level
    try:
        with pipe_safe_output():
            return _main(argv)
    finally:
        logger.setLevel(level)  # main() may run inside another program (or a test): leave it as it was


def _main(argv: Sequence[str] | None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
    _merge_global_flags(args)
    _configure_logging(args)
    try:
        handler: Handler = args.handler
        code = handler(args)
        raise_if_interrupted()  # a Ctrl-C that native code swallowed still ends the command
        return code
    except UserError as error:
        return _fail(args, error, 2)
    except VerificationError as error:
        return _fail(args, error, 1)
    except IroptError as error:
        return _fail(args, error, 1)
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as error:  # a file that cannot be read or written where the code did not expect it
        return _fail(args, UserError(_os_error_text(error)), 2)
    except Exception as error:  # a bug: say so plainly, the traceback is one -v away
        return _fail(args, error, 1, prefix="internal error")


def _os_error_text(error: OSError) -> str:
    """'PATH: reason' in words, the path cut short when long."""
    from iropt.util.text import shorten_path

    reason = error.strerror or str(error)
    return f"{shorten_path(str(error.filename))}: {reason}" if error.filename else reason


def _interrupted() -> int:
    """Ctrl-C: no traceback, nothing half-written (saves stage their files and clean up on the
    way out), and the shell's exit status for SIGINT."""
    print("iropt: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _fail(args: argparse.Namespace, error: BaseException, code: int, prefix: str = "error") -> int:
    from iropt.app.console import stderr

    if getattr(args, "verbose", 0):
        stderr.print("".join(traceback.format_exception(error)), markup=False)
    message = str(error) if prefix == "error" else f"{type(error).__name__}: {error}"
    # Schedule errors already read "file:line:col: error: ..."; do not say "error" twice.
    lead = "iropt: " if ": error:" in message.split("\n", 1)[0] else f"iropt: {prefix}: "
    stderr.print(lead + message, markup=False)
    if prefix != "error" and not getattr(args, "verbose", 0):
        stderr.print("(run with -v for the traceback)", markup=False)
    return code


def _merge_global_flags(args: argparse.Namespace) -> None:
    """-q and -v count wherever they are given: before the command (`iropt -q run ...`, as
    `iropt --help` shows them) or after it (`iropt run -q ...`)."""
    args.quiet = bool(args.quiet or getattr(args, "command_quiet", False))
    args.verbose = int(args.verbose) + int(getattr(args, "command_verbose", 0))


# The logger every iropt module logs under ("iropt", "iropt.model", ...).
_LOGGER = "iropt"


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if args.quiet:
        level = logging.ERROR
    # The level is set on iropt's own logger, not through basicConfig alone: basicConfig does
    # nothing once the root logger has a handler (an embedding application's, pytest's).
    logger = logging.getLogger(_LOGGER)
    logger.setLevel(level)
    logging.basicConfig(format="iropt: %(levelname)s: %(message)s", stream=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iropt",
        description="A compiler-style graph optimizer for ONNX models: verified rewrites, "
        "quantization and back ends, driven by schedule files.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more detail (-vv: debug); tracebacks on errors")
    # The same flags after the command, under their own names (a subcommand's defaults would
    # otherwise overwrite what was given before the command); merged in _merge_global_flags.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", dest="command_quiet", action="store_true", help="print only errors")
    common.add_argument("-v", "--verbose", dest="command_verbose", action="count", default=0,
                        help="more detail (-vv: debug); tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"iropt {importlib.metadata.version('iropt')}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_run(sub, common)
    _add_passes(sub, common)
    _add_check(sub, common)
    _add_compare(sub, common)
    _add_inspect(sub, common)
    _add_bench(sub, common)
    _add_export(sub, common)
    _add_batch(sub, common)
    _add_tune(sub, common)
    return parser


def _add_run(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run", parents=[common], help="optimize a model with a schedule, verified",
        description="Run SCHEDULE (a file or a built-in name such as 'default') on MODEL, check the "
        "result against the input through ONNX Runtime, and write it (default: MODEL.opt.onnx).",
    )
    p.add_argument("schedule", help="schedule file (.opt) or built-in schedule name")
    p.add_argument("model", type=Path, help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", type=Path, help="output model path (default: beside the input, *.opt.onnx)")
    p.add_argument("--calibration", help="calibration data: .npz, folder of .npy/.npz, or module:function")
    p.add_argument("--inputs", help="verification inputs: .npz, folder of .npy/.npz, or module:function "
                   "(default: generated from the declared shapes)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="concrete shape for a dynamic input, e.g. x:1x3x224x224 (repeatable); "
                   "MIN,OPT,MAX such as x:1x3x224x224,4x3x224x224,8x3x224x224 gives a TensorRT "
                   "profile range (verification uses OPT)")
    p.add_argument("--report", type=Path, help="write a JSON report here")
    p.add_argument("--verify-each", action="store_true", help="verify after every pass")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--force", action="store_true", help="write the output even when verification fails")
    p.add_argument("--dump-ir", type=Path, metavar="DIR", help="save the model after every pass into DIR")
    p.add_argument("--check-each", action="store_true",
                   help="run the ONNX checker after every pass (the result is always checked)")
    p.add_argument("--no-emit", action="store_true", help="do not write the target back end's artefacts")
    p.add_argument("--triton", type=Path, metavar="DIR",
                   help="also write a Triton model repository entry: DIR/NAME/config.pbtxt and "
                   "DIR/NAME/1/model.onnx (model.plan with target tensorrt)")
    p.add_argument("--triton-name", metavar="NAME", help="the Triton model name (default: the input's stem)")
    _add_plugin_argument(p)
    p.set_defaults(handler=_cmd_run)


def _add_plugin_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (package.module) or a Python file that registers passes or "
                   "back ends before the schedule is read (repeatable; also IROPT_PLUGINS, "
                   "separated by ':', ';' on Windows)")


def _cmd_run(args: argparse.Namespace) -> int:
    from iropt.app.console import PhaseProgress, make_progress
    from iropt.app.optimize import RunOptions, RunOutcome, optimize, raise_if_unverified
    from iropt.app.plugins import load_plugins
    from iropt.app.report import check_report_path
    from iropt.verify.feeds import parse_shape_ranges

    if args.report is not None:
        check_report_path(args.report)
    if args.report is not None:
        from iropt.app.optimize import default_output_path
        from iropt.io.save import check_output_file

        check_output_file(args.report, "the report", [args.model, args.output or default_output_path(args.model)])
    build_progress = PhaseProgress(not args.quiet)
    shape_ranges = parse_shape_ranges(args.shape)
    options = RunOptions(
        schedule=args.schedule,
        model=args.model,
        output=args.output,
        calibration=args.calibration,
        inputs=args.inputs,
        shapes={name: list(r.opt) for name, r in shape_ranges.items()},
        shape_ranges=shape_ranges,
        verify=not args.no_verify,
        verify_each=args.verify_each,
        force=args.force,
        dump_dir=args.dump_ir,
        check_each=args.check_each,
        emit=not args.no_emit,
        build_progress=build_progress,
        triton=args.triton,
        triton_name=args.triton_name,
        status=_status_line if not args.quiet else None,
    )
    outcome = RunOutcome()
    failure: BaseException | None = None
    try:
        load_plugins(args.plugin)
        optimize(options, progress=make_progress(not args.quiet), outcome=outcome)
    except BaseException as error:
        failure = error
        raise
    finally:
        build_progress.close()
        _finish_run(args, outcome, failure)
    # The comparisons were printed above unless -q: the error then only sums them up.
    raise_if_unverified(outcome, details=args.quiet)
    return 0


def _status_line(text: str) -> None:
    from iropt.app.console import stderr

    stderr.print(f"iropt: {text}", markup=False)


def _finish_run(args: argparse.Namespace, outcome: Any, failure: BaseException | None) -> None:
    """What every run leaves, however it ends: the report (with the failure in it) and the
    per-pass table of the passes that ran."""
    from iropt.app.console import pass_table, stdout
    from iropt.app.report import outcome_to_dict, write_report

    if args.report is not None:
        write_report(outcome_to_dict(outcome, args.schedule, args.model, failure), args.report)
    if args.quiet:
        return
    if outcome.report.records or failure is None:
        stdout.print(pass_table(outcome.report.records, outcome.initial, outcome.final))
    for note in outcome.feed_notes:
        stdout.print(f"inputs: {note}", markup=False)
    for failure in outcome.pass_failures:  # --verify-each --force: noted, and the run went on
        stdout.print(f"verification FAILED: {failure}", markup=False)
    for comparison in outcome.comparisons:
        status = "passed" if comparison.passed else "FAILED"
        stdout.print(f"verification {status} ({comparison.criterion.describe()}):", markup=False)
        stdout.print(comparison.summary(), markup=False)
    for line in outcome.target_lines:
        stdout.print(line, markup=False)
    for written in (outcome.output, *outcome.emitted, *outcome.triton_files):
        if written is not None:
            stdout.print(f"wrote {written}", markup=False)


def _add_passes(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("passes", parents=[common], help="list passes, or describe one",
                       description="List the registered passes (built-in and plugins), or show one in full.")
    p.add_argument("name", nargs="?", help="a pass (or, with --targets, a back end) to describe")
    p.add_argument("--targets", action="store_true", help="list back ends instead of passes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_plugin_argument(p)
    p.set_defaults(handler=_cmd_passes)


def _cmd_passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from iropt.app.console import stdout
    from iropt.app.plugins import load_plugins
    from iropt.infra.registry import BACKENDS, PASSES
    from iropt.schedules import builtin_schedule_names

    load_plugins(args.plugin)
    registry = BACKENDS if args.targets else PASSES
    if args.name:
        entry = registry.get(args.name)
        if args.json:
            print(json.dumps(_entry_dict(entry), indent=2))
            return 0
        kind = f" ({entry.kind.value})" if entry.kind else ""
        stdout.print(f"[bold]{entry.name}[/bold]{kind} — {entry.origin}")
        stdout.print(entry.doc, markup=False)
        stdout.print("\noptions:" if entry.options else "\noptions: none")
        for spec in entry.options:
            default = "required" if spec.required else f"default {spec.default!r}"
            stdout.print(f"  {spec.name}: {spec.type_name} ({default})", markup=False)
        return 0
    entries = registry.entries()
    if args.json:
        print(json.dumps([_entry_dict(e) for e in entries], indent=2))
        return 0
    table = Table(show_edge=False)
    for column in ("name", "kind", "options", "summary"):
        # Wrapped, never cut: a long word ("Transpose/Reshape/Cast/...") breaks across lines.
        table.add_column(column, overflow="fold")
    for e in entries:
        table.add_row(e.name, e.kind.value if e.kind else "target", ", ".join(s.name for s in e.options), e.summary)
    stdout.print(table)
    if not args.targets:
        stdout.print(f"built-in schedules: {', '.join(builtin_schedule_names())}", markup=False)
    return 0


def _entry_dict(entry: Any) -> dict[str, Any]:
    return {
        "name": entry.name,
        "kind": entry.kind.value if entry.kind else "target",
        "origin": entry.origin,
        "summary": entry.summary,
        "options": [
            {"name": s.name, "type": s.type_name, "required": s.required,
             "default": None if s.required else repr(s.default)}
            for s in entry.options
        ],
    }


def _add_check(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[common], help="parse and check a schedule without running it",
                       description="Parse SCHEDULE and check every pass name and option against the registry.")
    p.add_argument("schedule", help="schedule file (.opt) or built-in schedule name")
    _add_plugin_argument(p)
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from iropt.app.console import stdout
    from iropt.app.optimize import load_pipeline
    from iropt.app.plugins import load_plugins

    load_plugins(args.plugin)
    pipeline = load_pipeline(args.schedule)
    if not args.quiet:
        names = [p.name for p in pipeline.passes()]
        target = f", target {pipeline.target.name}" if pipeline.target else ""
        stdout.print(f"{args.schedule}: ok ({len(names)} pass steps{target})", markup=False)
    return 0


def _add_compare(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("compare", parents=[common], help="compare two models' outputs",
                       description="Run models A and B on the same inputs through ONNX Runtime (its graph "
                       "optimizations off) and compare outputs. Exit code 1 when they differ.")
    p.add_argument("a", type=Path, help="reference model")
    p.add_argument("b", type=Path, help="candidate model")
    p.add_argument("--inputs", help="inputs: .npz, folder of .npy/.npz, or module:function (default: generated)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS", help="shape for a dynamic input")
    p.add_argument("--metric", default="tolerance", choices=["tolerance", "cosine", "snr", "top1", "max_abs", "max_rel"])
    p.add_argument("--rtol", type=float, help="relative tolerance (default: from the output type, 1e-4 for fp32)")
    p.add_argument("--atol", type=float, help="absolute tolerance (default: from the output type, 1e-5 for fp32)")
    p.add_argument("--min", type=float, help="lower bound for cosine/snr/top1")
    p.add_argument("--max", type=float, help="upper bound for max_abs/max_rel")
    p.add_argument("--samples", type=int, default=2, help="generated input samples")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    from iropt.app.console import make_progress, stdout
    from iropt.io.load import load_model
    from iropt.verify.criteria import Criterion
    from iropt.verify.feeds import open_feeds, parse_shape_overrides
    from iropt.verify.runtime import reference_runner
    from iropt.verify.verifier import Verifier

    try:
        criterion = Criterion(metric=args.metric, rtol=args.rtol, atol=args.atol, min=args.min,
                              max=args.max, samples=args.samples)
    except ValueError as error:
        raise UserError(str(error)) from error
    a = load_model(args.a)
    load_model(args.b)  # checked as the reference is: a bad file is bad input, named as such
    feeds = open_feeds(args.inputs, a, shapes=parse_shape_overrides(args.shape), count=criterion.samples)
    # Both files run as they are, not as iropt re-encodes them.
    verifier = Verifier(a, feeds.feeds, progress=make_progress(not args.quiet), reference_file=args.a)
    try:
        verifier.reference_outputs()
    except UserError as error:
        raise UserError(f"{args.a}: {error}") from error
    try:
        outputs = verifier.run(reference_runner(args.b))
    except UserError as error:
        raise UserError(f"{args.b}: {error}") from error
    comparison = verifier.check_outputs(outputs, criterion)
    if args.json:
        print(json.dumps(comparison.to_dict(), indent=2))
    elif not args.quiet:
        stdout.print(f"{'match' if comparison.passed else 'MISMATCH'} ({criterion.describe()}):", markup=False)
        stdout.print(comparison.summary(), markup=False)
    return 0 if comparison.passed else 1


def _add_inspect(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("inspect", parents=[common], help="summarize a model",
                       description="Op histogram, parameters, bytes, opset, inputs and outputs with shapes.")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from iropt.app.console import model_summary, print_model_summary
    from iropt.io.load import load_model

    summary = model_summary(load_model(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_model_summary(summary)
    return 0


def _add_bench(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench", parents=[common], help="measure models on ONNX Runtime, side by side",
        description="Latency (p50/p95/p99), throughput, session start time and peak memory of each "
        "MODEL on ONNX Runtime. Each model runs in its own process; the models take turns, and the "
        "table gives every figure as a ratio to the first model's.",
    )
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL", help=".onnx models (the first is the baseline)")
    p.add_argument("--providers", default="CPUExecutionProvider",
                   help="execution providers in order of preference, comma-separated (default: CPU)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (default 0: ONNX Runtime's choice)")
    p.add_argument("--batch", type=int, help="batch size for inputs with a dynamic first dimension")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="concrete shape for an input, e.g. x:1x3x224x224 (repeatable)")
    p.add_argument("--inputs", help="inputs: .npz, folder of .npy/.npz, or module:function (default: generated)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model first (default 10)")
    p.add_argument("--runs", type=int, default=100, help="timed runs per model (default 100)")
    p.add_argument("--rounds", type=int, default=10, help="turns the timed runs are split into (default 10)")
    p.add_argument("--optimization-level", default="all", choices=["disable", "basic", "extended", "layout", "all"],
                   help="ONNX Runtime graph optimization level (default all)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure and latency here as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the latency distributions (needs matplotlib)")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from iropt.app import bench
    from iropt.app.console import make_progress, stdout
    from iropt.verify.feeds import parse_shape_overrides

    options = bench.BenchOptions(
        models=tuple(args.models),
        providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()),
        threads=args.threads, batch=args.batch, shapes=parse_shape_overrides(args.shape), inputs=args.inputs,
        warmup=args.warmup, runs=args.runs, rounds=args.rounds, optimization_level=args.optimization_level,
    )
    options.check()
    if args.json is not None:
        bench.check_output_file(args.json, None, options.models)
    if args.plot is not None:
        bench.check_output_file(args.plot, ".png", options.models)
        bench.check_plot_available()
    result = bench.run_bench(options, progress=make_progress(not args.quiet))
    if not args.quiet:
        stdout.print(bench.bench_table(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plot is not None:
        bench.plot_latencies(result, args.plot)
    return 0


def _add_export(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("export", parents=[common], help="export a PyTorch module to ONNX (needs iropt[torch])",
                       description="Export the torch.nn.Module returned by a factory (package.module:factory "
                       "or path/to/file.py:factory) to ONNX with a dynamic batch dimension.")
    try:
        from iropt.lowering.torch_frontend import add_export_arguments
    except ImportError:  # the front end module is optional at import time; torch is imported lazily
        return
    add_export_arguments(p)
    p.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from iropt.lowering.torch_frontend import run_export

    result: int = run_export(args)
    return result


def _add_batch(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "batch", parents=[common], help="run a schedule over many models on Ray (needs iropt[distributed])",
        description="Run SCHEDULE on every MODEL (or every model of --manifest) as a Ray task, each "
        "verified like `iropt run` and written to DIR/NAME.opt.onnx. A local Ray instance is started "
        "unless --address or RAY_ADDRESS names a cluster. DIR/ledger.jsonl records every result; a "
        "rerun skips the models already done with the same model, data and schedule.",
    )
    p.add_argument("schedule", help="schedule file (.opt) or built-in schedule name")
    p.add_argument("models", nargs="*", type=Path, help="input .onnx models (never modified)")
    p.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR", help="folder for the results")
    p.add_argument("--manifest", type=Path, help="TOML or JSON file listing models with their inputs, "
                   "calibration data and shapes (paths relative to it)")
    p.add_argument("--inputs", help="verification inputs for every MODEL given on the command line")
    p.add_argument("--calibration", help="calibration data for every MODEL given on the command line")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="concrete shape for a dynamic input of the command-line models (repeatable)")
    _add_ray_arguments(p)
    p.add_argument("--retries", type=int, default=3, help="times a task is retried when its worker is lost")
    p.add_argument("--rerun", action="store_true", help="run every model again, even those in the ledger")
    p.add_argument("--no-latency", action="store_true", help="do not measure latency before and after")
    p.add_argument("--json", type=Path, help="also write the summary JSON here (always: DIR/summary.json)")
    p.set_defaults(handler=_cmd_batch)


def _add_ray_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray instance (default: all)")


def _check_workers(args: argparse.Namespace) -> None:
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")


def _cmd_batch(args: argparse.Namespace) -> int:
    from iropt.app.batch import (
        SUMMARY_COLUMNS,
        BatchOptions,
        items_from_paths,
        plan_batch,
        read_manifest,
        run_batch,
        summary_cells,
        write_summary,
    )
    from iropt.app.console import make_progress, stdout, table_of
    from iropt.app.distributed import connect, import_ray
    from iropt.verify.feeds import parse_shape_overrides

    import_ray("batch")  # before any work: without Ray, say how to install it
    items = items_from_paths(args.models, parse_shape_overrides(args.shape), args.inputs, args.calibration)
    if args.manifest is not None:
        items += read_manifest(args.manifest)
    if not items:
        raise UserError("iropt batch: no models; give MODEL paths or --manifest")
    _check_workers(args)
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UserError(f"{args.output_dir}: exists and is not a folder")
    options = BatchOptions(schedule=args.schedule, items=tuple(items), out_dir=args.output_dir,
                           retries=args.retries, rerun=args.rerun, measure_latency=not args.no_latency)
    plan = plan_batch(options)  # a bad schedule is bad input before Ray starts
    if plan.todo:
        with connect("batch", address=args.address, num_cpus=args.workers) as ray:
            result = run_batch(ray, options, plan, progress=make_progress(not args.quiet))
    else:  # everything is in the ledger: no need to start Ray
        result = run_batch(None, options, plan)
    written = write_summary(result, options)
    if args.json is not None:
        write_summary(result, options, args.json)
    if not args.quiet:
        stdout.print(table_of("batch", SUMMARY_COLUMNS, [summary_cells(row) for row in result.rows]))
        stdout.print(f"{result.ran} ran, {result.skipped} done before, {result.seconds:.1f}s; wrote {written}",
                     markup=False)
    return 0 if result.all_ok else 1


def _add_tune(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "tune", parents=[common], help="search schedule options on Ray Tune (needs iropt[distributed])",
        description="Search the schedules and pass options of SPACE (a TOML file) for MODEL with Ray Tune: "
        "each trial optimizes, verifies and measures the objective. Writes DIR/trials.json, the Pareto "
        "front of the objective against the constraint's metric (DIR/pareto.json, DIR/pareto.svg) and "
        "the best schedule meeting the constraint as DIR/best.opt, which `iropt run` reproduces.",
    )
    p.add_argument("model", type=Path, help="input .onnx model (never modified)")
    p.add_argument("--space", type=Path, required=True, help="search space (.toml)")
    p.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR", help="folder for the results")
    p.add_argument("--objective", default="latency", choices=["latency", "size", "nodes"],
                   help="what to minimize (latency: median ms on ONNX Runtime CPU, one thread)")
    p.add_argument("--constraint", default="cosine>=0.99",
                   help="what every kept schedule must meet, e.g. cosine>=0.99, top1>=0.98, max_abs<=1e-3")
    p.add_argument("--trials", type=int, default=16, help="number of trials")
    p.add_argument("--search", default="optuna", choices=["random", "optuna"],
                   help="searcher: random sampling, or Optuna's TPE (model-based)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="trials at once (default 1: latency measured without neighbours)")
    p.add_argument("--seed", type=int, default=0, help="seed of the searcher")
    p.add_argument("--inputs", help="verification inputs: .npz, folder of .npy/.npz, or module:function")
    p.add_argument("--calibration", help="calibration data for schedules that quantize")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS", help="shape for a dynamic input")
    _add_ray_arguments(p)
    p.set_defaults(handler=_cmd_tune)


def _cmd_tune(args: argparse.Namespace) -> int:
    from iropt.app.console import stdout, table_of
    from iropt.app.distributed import connect, import_ray
    from iropt.app.tune import (
        TrialSetup,
        TuneOptions,
        parse_constraint,
        read_space,
        run_tune,
        tune_table_rows,
        with_baseline,
        write_results,
    )
    from iropt.io.load import load_model
    from iropt.verify.feeds import parse_shape_overrides

    import_ray("tune")
    _check_workers(args)
    if args.trials < 1 or args.concurrency < 1:
        raise UserError("--trials and --concurrency must be at least 1")
    constraint = parse_constraint(args.constraint)
    space = read_space(args.space)
    load_model(args.model)  # an unreadable model is bad input before Ray starts
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UserError(f"{args.output_dir}: exists and is not a folder")
    setup = TrialSetup(model=str(args.model.resolve()), space=space, objective=args.objective,
                       constraint=constraint, inputs=args.inputs, calibration=args.calibration,
                       shapes=parse_shape_overrides(args.shape))
    setup = with_baseline(setup)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    options = TuneOptions(setup=setup, out_dir=args.output_dir, trials=args.trials, searcher=args.search,
                          concurrency=args.concurrency, seed=args.seed)
    with connect("tune", address=args.address, num_cpus=args.workers) as ray:
        rows = run_tune(ray, options)
    written = write_results(rows, options)
    if not args.quiet:
        columns, cells = tune_table_rows(rows, setup)
        stdout.print(table_of("trials", columns, cells))
        for path in written.values():
            stdout.print(f"wrote {path}", markup=False)
        if "best" not in written:
            stdout.print(f"no trial met {constraint.describe()}; no best.opt written", markup=False)
    return 0 if "best" in written else 1


if __name__ == "__main__":
    sys.exit(main())
