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
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except KeyboardInterrupt:
        return _interrupted()
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
    from iropt.util.text import shorten

    reason = error.strerror or str(error)
    return f"{shorten(str(error.filename))}: {reason}" if error.filename else reason


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


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", 0):
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if getattr(args, "quiet", False):
        level = logging.ERROR
    logging.basicConfig(level=level, format="iropt: %(levelname)s: %(message)s", stream=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("-v", "--verbose", action="count", default=0, help="more detail; tracebacks on errors")
    parser = argparse.ArgumentParser(
        prog="iropt",
        description="A compiler-style graph optimizer for ONNX models: verified rewrites, "
        "quantization and back ends, driven by schedule files.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"iropt {importlib.metadata.version('iropt')}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_run(sub, common)
    _add_passes(sub, common)
    _add_check(sub, common)
    _add_compare(sub, common)
    _add_inspect(sub, common)
    _add_bench(sub, common)
    _add_export(sub, common)
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
    p.set_defaults(handler=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    from iropt.app.console import PhaseProgress, make_progress, pass_table, stdout
    from iropt.app.optimize import RunOptions, default_output_path, optimize, raise_if_unverified
    from iropt.app.report import outcome_to_dict, write_report
    from iropt.io.save import check_output_file
    from iropt.verify.feeds import parse_shape_ranges

    if args.report is not None:
        output = args.output or default_output_path(args.model)
        check_output_file(args.report, "the report", [args.model, output])
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
    )
    try:
        outcome = optimize(options, progress=make_progress(not args.quiet))
    finally:
        build_progress.close()
    if args.report is not None:
        write_report(outcome_to_dict(outcome, args.schedule, args.model), args.report)
    if not args.quiet:
        stdout.print(pass_table(outcome.report.records, outcome.initial, outcome.final))
        for note in outcome.feed_notes:
            stdout.print(f"inputs: {note}", markup=False)
        for comparison in outcome.comparisons:
            status = "passed" if comparison.passed else "FAILED"
            stdout.print(f"verification {status} ({comparison.criterion.describe()}):", markup=False)
            stdout.print(comparison.summary(), markup=False)
        for line in outcome.target_lines:
            stdout.print(line, markup=False)
        if outcome.output is not None:
            stdout.print(f"wrote {outcome.output}", markup=False)
        for path in [*outcome.emitted, *outcome.triton_files]:
            stdout.print(f"wrote {path}", markup=False)
    raise_if_unverified(outcome)
    return 0


def _add_passes(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("passes", parents=[common], help="list passes, or describe one",
                       description="List the registered passes (built-in and plugins), or show one in full.")
    p.add_argument("name", nargs="?", help="a pass (or, with --targets, a back end) to describe")
    p.add_argument("--targets", action="store_true", help="list back ends instead of passes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_cmd_passes)


def _cmd_passes(args: argparse.Namespace) -> int:
    from rich.table import Table

    from iropt.app.console import stdout
    from iropt.infra.registry import BACKENDS, PASSES
    from iropt.schedules import builtin_schedule_names

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
        table.add_column(column)
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
    p.set_defaults(handler=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    from iropt.app.console import stdout
    from iropt.app.optimize import load_pipeline

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
    from iropt.verify.runtime import file_runner
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
        outputs = verifier.run(file_runner(args.b))
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


if __name__ == "__main__":
    sys.exit(main())
