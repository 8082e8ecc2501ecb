"""How iropt's `default` schedule scales with graph size: 10k, 50k and 100k generated nodes.

The generated graph is a long chain of small blocks over a [1, 4, 4, 4] tensor, so the work
is all graph handling (matching, rewriting, copying, checking), not arithmetic. Each block
holds what the default schedule removes or rewrites, in proportion:

    a = Add(h, bias_i); m = Mul(a, scale_i); i = Identity(m)        identity to remove
    k = Add(one, shift_i)                                           constants to fold
    b = Add(i, k); r = Relu(b); r2 = Relu(b); s = Max(r, r2)        common subexpression
    t = Transpose(s, [0,2,3,1]); h' = Transpose(t, [0,3,1,2])       transposes that cancel
    every 4th block: Conv(h', W_i, B_i) -> BatchNormalization      Conv+BN to fuse

`one` is the same value in every block (duplicate initializers to dedupe). Each size runs in a
child process of its own (model built and saved there, then timed from a fresh load, verify
off, as `iropt run default` does), so the peak resident memory of one size does not carry
into the next. Reported: wall and CPU time of the whole `optimize` call (load, schedule,
save), CPU time per node, the CPU time of each pass (summed over fixpoint rounds) and of
everything outside the passes; peak RSS (reset after the model is built) and its growth over
the RSS before the run.
Run: `.venv/bin/python bench/scaling.py [--sizes 10000,50000,100000]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table
from latency import peak_rss_mb, reset_peak_rss, rss_now_mb, run_child

SIZES = [10_000, 50_000, 100_000]
CHANNELS = 4
CHILD_TIMEOUT_S = 420.0
# A pass whose time grows by more than this when the graph grows 10x is flagged as superlinear
# (linear is 10; n log n from 10k to 100k is about 12.5).
SUPERLINEAR_RATIO = 15.0
# ... and whose time grows more than this many times faster than the nodes between the two
# largest sizes (2x the nodes: linear 2, quadratic 4).
TOP_SLACK = 1.3


def build_model(target_nodes: int) -> onnx.ModelProto:
    """A chain of blocks (see the module docstring) with about `target_nodes` nodes."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    rng = np.random.default_rng(0)
    shape_c = [1, CHANNELS, 1, 1]
    inits.append(numpy_helper.from_array(np.ones(shape_c, np.float32), "one_0"))
    h = "x"
    i = 0
    while len(nodes) < target_nodes:
        p = f"b{i}_"

        def const(name: str, value: np.ndarray, p: str = p) -> str:
            inits.append(numpy_helper.from_array(value.astype(np.float32), p + name))
            return p + name

        bias = const("bias", rng.normal(0, 0.01, shape_c))
        scale = const("scale", 1 + rng.normal(0, 0.01, shape_c))
        shift = const("shift", rng.normal(0, 0.01, shape_c))
        # A duplicate of one_0 per block: dedupe_initializers folds them back into one.
        one = const("one", np.ones(shape_c, np.float32))
        nodes += [
            helper.make_node("Add", [h, bias], [p + "a"]),
            helper.make_node("Mul", [p + "a", scale], [p + "m"]),
            helper.make_node("Identity", [p + "m"], [p + "i"]),
            helper.make_node("Add", [one, shift], [p + "k"]),
            helper.make_node("Add", [p + "i", p + "k"], [p + "b"]),
            helper.make_node("Relu", [p + "b"], [p + "r"]),
            helper.make_node("Relu", [p + "b"], [p + "r2"]),
            helper.make_node("Max", [p + "r", p + "r2"], [p + "s"]),
            helper.make_node("Transpose", [p + "s"], [p + "t"], perm=[0, 2, 3, 1]),
            helper.make_node("Transpose", [p + "t"], [p + "h"], perm=[0, 3, 1, 2]),
        ]
        h = p + "h"
        if i % 4 == 3:
            w = const("w", np.eye(CHANNELS)[:, :, None, None] + rng.normal(0, 0.01, (CHANNELS, CHANNELS, 1, 1)))
            wb = const("wb", rng.normal(0, 0.01, (CHANNELS,)))
            gamma = const("gamma", 1 + rng.normal(0, 0.01, (CHANNELS,)))
            beta = const("beta", rng.normal(0, 0.01, (CHANNELS,)))
            mean = const("mean", rng.normal(0, 0.01, (CHANNELS,)))
            var = const("var", 1 + np.abs(rng.normal(0, 0.01, (CHANNELS,))))
            nodes += [
                helper.make_node("Conv", [h, w, wb], [p + "c"]),
                helper.make_node("BatchNormalization", [p + "c", gamma, beta, mean, var], [p + "n"]),
            ]
            h = p + "n"
        i += 1
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    io_shape = [1, CHANNELS, 4, 4]
    graph = helper.make_graph(
        nodes,
        f"chain_{target_nodes}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, io_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, io_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def child(size: int, gc_off: bool = False) -> None:
    """One measurement: build and save the model, then `optimize` it from the file.

    `optimize(RunOptions(schedule="default", verify=False))` is what `iropt run default
    --no-verify` runs, with whatever instruments and checks it has by default. Times are CPU
    time (`time.process_time`) as well as wall time, because other work on a shared machine
    inflates wall time at random, which would read as superlinear growth. For CPU time per
    pass, this child process (only) has `optimize` use a TimingInstrument that reads the
    process clock instead of the wall clock. With `gc_off`, Python's cyclic garbage collector
    is disabled for the run (to tell its cost from the passes').
    """
    import gc
    import logging

    import iropt.app.optimize
    from iropt.app.optimize import RunOptions, optimize
    from iropt.infra.instruments import TimingInstrument

    class CpuTiming(TimingInstrument):
        """TimingInstrument on the process CPU clock."""

        def before_pass(self, record: Any, model: Any) -> None:
            self._cpu_start = time.process_time()

        def after_pass(self, record: Any, model: Any, result: Any) -> None:
            record.seconds = time.process_time() - self._cpu_start

    iropt.app.optimize.TimingInstrument = CpuTiming  # type: ignore[misc]
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="iropt-bench-scaling-") as tmp:
        src, dst = Path(tmp, "chain.onnx"), Path(tmp, "chain.opt.onnx")
        proto = build_model(size)
        onnx.save(proto, str(src))
        del proto
        gc.collect()
        before = rss_now_mb()
        reset_peak_rss()
        if gc_off:
            gc.disable()
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = optimize(RunOptions(schedule="default", model=src, output=dst, verify=False))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    passes: dict[str, float] = {}
    rounds: dict[str, int] = {}
    for record in outcome.report.records:
        passes[record.name] = passes.get(record.name, 0.0) + (record.seconds or 0.0)
        rounds[record.name] = rounds.get(record.name, 0) + 1
    print(json.dumps({
        "size": size, "gc_off": gc_off, "wall": wall, "cpu": cpu, "outside": cpu - sum(passes.values()),
        "nodes_before": outcome.initial.nodes, "nodes_after": outcome.final.nodes,
        "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "passes": passes, "rounds": rounds,
    }))


def render(results: Sequence[dict[str, Any]], gc_off: Sequence[dict[str, Any]] = ()) -> str:
    ok = [r for r in results if "error" not in r]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([f"{r['size']:,}", f"failed: {r['error']}", *["-"] * 6])
            continue
        in_passes = sum(r["passes"].values())
        rows.append([
            f"{r['nodes_before']:,} -> {r['nodes_after']:,}",
            f"{r['wall']:.1f}",
            f"{r['cpu']:.1f}",
            f"{r['cpu'] / r['nodes_before'] * 1e6:.0f}",
            f"{in_passes:.1f}",
            f"{r['outside']:.1f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_rss_mb'] - r['rss_before_mb']:.0f}",
        ])
    parts = [markdown_table(
        ["nodes (before -> after)", "wall s", "CPU s", "CPU us / node", "passes CPU s",
         "outside passes CPU s (load, instruments, checks, save)", "peak RSS MiB", "peak RSS growth MiB"],
        rows), ""]
    by_size = {r["size"]: r for r in ok}
    small, large = min(by_size, default=None), max(by_size, default=None)
    if small is not None and large is not None and small != large:
        parts += _pass_table(ok, small, large, gc_off)
    failed = [r for r in results if "error" in r]
    if failed:
        parts.append("Failed sizes: " + "; ".join(f"{r['size']:,}: {r['error']}" for r in failed))
    return "\n".join(parts)


def _pass_table(
    ok: Sequence[dict[str, Any]], small: int, large: int, gc_off: Sequence[dict[str, Any]]
) -> list[str]:
    """Per-pass CPU at each size; a pass counts as superlinear only if it is so with the garbage
    collector off too (the collector's cost grows with the live heap, i.e. the graph, and lands
    on whichever pass allocates when it runs)."""
    by_size = {r["size"]: r for r in ok}
    off = {r["size"]: r for r in gc_off}
    has_off = small in off and large in off
    a, b = by_size[small], by_size[large]
    nodes_ratio = b["nodes_before"] / a["nodes_before"]
    threshold = SUPERLINEAR_RATIO * nodes_ratio / 10
    names = sorted(b["passes"], key=lambda n: -b["passes"][n])
    sizes = sorted(by_size)
    rows, flagged, gc_driven = [], [], []
    parts_of_run = [("all passes", lambda r: sum(r["passes"].values())),
                    ("outside passes (load, instruments, checks, save)", lambda r: r["outside"])]
    for label, get in parts_of_run:
        times = [get(by_size[s]) for s in sizes]
        off_times = [get(off[small]), get(off[large])] if has_off else []
        rows.append([f"**{label}**", "", *[f"{t:.2f}" for t in times], _ratio_text(times),
                     *([f"{t:.2f}" for t in off_times] + [_ratio_text(off_times)] if has_off else [])])
    for name in names:
        times = [by_size[s]["passes"].get(name, 0.0) for s in sizes]
        ratio = times[-1] / times[0] if times[0] > 0 else float("inf")
        off_times = [off[small]["passes"].get(name, 0.0), off[large]["passes"].get(name, 0.0)] if has_off else []
        off_ratio = off_times[1] / off_times[0] if has_off and off_times[0] > 0 else None
        # Superlinear: beyond the threshold from the smallest size, and growing faster than
        # the nodes between the two largest sizes too (the smallest size carries fixed costs,
        # and one noisy point alone should not decide). Passes well under a second at the
        # largest size are dominated by timer noise.
        top_ratio = times[-1] / times[-2] if len(times) > 2 and times[-2] > 0 else ratio
        top_nodes = b["nodes_before"] / by_size[sizes[-2]]["nodes_before"] if len(sizes) > 2 else nodes_ratio
        if ratio > threshold and top_ratio > TOP_SLACK * top_nodes and times[-1] > 0.5:
            if off_ratio is not None and off_ratio <= threshold:
                gc_driven.append(f"{name} ({ratio:.0f}x, {off_ratio:.0f}x with GC off)")
            else:
                flagged.append(f"{name} ({ratio:.0f}x" + ("" if off_ratio is None else f", {off_ratio:.0f}x with GC off") + ")")
        rows.append([name, str(b["rounds"].get(name, 0)), *[f"{t:.3f}" for t in times], _ratio_text(times),
                     *([f"{t:.3f}" for t in off_times] + [_ratio_text(off_times)] if has_off else [])])
    total_ratio = b["cpu"] / a["cpu"]
    lines = [
        f"time({large // 1000}k) / time({small // 1000}k) = {total_ratio:.1f} CPU "
        f"({b['wall'] / a['wall']:.1f} wall) for {nodes_ratio:.1f}x the nodes (linear: {nodes_ratio:.1f})",
        "",
        f"Top 5 passes at {large // 1000}k nodes (CPU): "
        + ", ".join(f"{n} {b['passes'][n]:.2f} s" for n in names[:5]),
        "",
        markdown_table(["pass (CPU s, summed over fixpoint rounds)", "runs",
                        *[f"{s // 1000}k" for s in sizes], f"{large // 1000}k / {small // 1000}k",
                        *([f"{small // 1000}k GC off", f"{large // 1000}k GC off", "ratio GC off"] if has_off else [])],
                       rows),
        "",
        "- " + ("PASS" if total_ratio <= threshold else "FAIL")
        + f": total CPU time grows about linearly (ratio {total_ratio:.1f}; limit {threshold:.1f} for "
        f"{nodes_ratio:.0f}x the nodes)",
        "- " + ("PASS" if not flagged else "FAIL") + f": no pass grows superlinearly (time ratio above "
        f"{threshold:.1f} from the smallest to the largest size and above {TOP_SLACK}x the node ratio "
        f"between the two largest, among passes over 0.5 s; with the garbage collector off as well as on)"
        + ("" if not flagged else ": " + ", ".join(flagged)),
    ]
    if has_off:
        off_ratio = off[large]["cpu"] / off[small]["cpu"]
        lines.append(f"- with the garbage collector off: total CPU ratio {off_ratio:.1f} "
                     f"({off[small]['cpu']:.1f} s -> {off[large]['cpu']:.1f} s)")
    if gc_driven:
        lines.append("- superlinear only with the garbage collector on (its cost grows with the live "
                     "heap and lands on passes that allocate): " + ", ".join(gc_driven))
    return lines


def _ratio_text(times: Sequence[float]) -> str:
    return f"{times[-1] / times[0]:.1f}" if times[0] > 0 else "-"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated node counts")
    parser.add_argument("--no-gc-runs", action="store_true",
                        help="skip the runs with the garbage collector off (smallest and largest size)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--gc-off", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.gc_off)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    plan = [(size, False) for size in sizes]
    if not args.no_gc_runs and len(sizes) > 1:
        plan += [(min(sizes), True), (max(sizes), True)]
    results: list[dict[str, Any]] = []
    gc_off: list[dict[str, Any]] = []
    for size, off in plan:
        print(f"scaling: {size:,} nodes{' (GC off)' if off else ''}", file=sys.stderr, flush=True)
        result = run_child([__file__, "--child", str(size), *(["--gc-off"] if off else [])], CHILD_TIMEOUT_S)
        (gc_off if off else results).append({"size": size, **result})
    print(render(results, [r for r in gc_off if "error" not in r]))


if __name__ == "__main__":
    main()
