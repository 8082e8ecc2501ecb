"""The optimization profile of a TensorRT build: MIN/OPT/MAX shapes for every dynamic input.

Where the shapes come from, first match wins, per input:

1. `--shape NAME:MIN,OPT,MAX` on the command line (`--shape NAME:DIMS` alone is a fixed
   profile at that shape: min = opt = max);
2. the target's `min_shapes` / `opt_shapes` / `max_shapes` options (one given alone fills the
   others: opt = max = min for `min_shapes`, min = opt = max for the others);
3. defaults, for the first (batch) dimension only: min `DYNAMIC_MIN`, opt `DYNAMIC_OPT`, max
   `DYNAMIC_MAX`. Any other dynamic dimension has no sensible default (an image height of 1
   to 8 pixels builds a useless engine or none), so an input with one and no shape given is
   refused with the `--shape` that would fix it.

The chosen profile is printed and reported; when a build fails, `failure_hint` names the
dynamic dimensions and how to give their range.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from iropt.errors import UserError
from iropt.util.suggest import did_you_mean
from iropt.verify.feeds import ShapeRange

# Defaults for a dynamic batch (first) dimension that no shape gives.
DYNAMIC_MIN = 1
DYNAMIC_OPT = 1
DYNAMIC_MAX = 8

SHAPE_OPTIONS = ("min_shapes", "opt_shapes", "max_shapes")


@dataclass(frozen=True)
class ProfileInput:
    """One dynamic input's profile and where it came from ("--shape", "target", "default")."""

    name: str
    declared: tuple[int, ...]  # -1 for a dynamic dimension
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    source: str

    def describe(self) -> str:
        def dims(shape: Sequence[int]) -> str:
            return "x".join(str(d) for d in shape)

        return f"{self.name}: min {dims(self.min)}, opt {dims(self.opt)}, max {dims(self.max)} ({self.source})"

    def dynamic_axes(self) -> list[int]:
        return [axis for axis, d in enumerate(self.declared) if d < 0]

    def to_dict(self) -> dict[str, object]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max), "source": self.source}


def target_ranges(tables: Mapping[str, Mapping[str, Sequence[int]]]) -> dict[str, ShapeRange]:
    """The target's min_shapes/opt_shapes/max_shapes as ranges; a missing bound is filled from
    the given ones (opt from min or max, then min/max from opt)."""
    names = [name for option in SHAPE_OPTIONS for name in tables.get(option, {})]
    ranges = {}
    for name in dict.fromkeys(names):
        low, opt, high = (tables.get(option, {}).get(name) for option in SHAPE_OPTIONS)
        opt = opt or high or low
        assert opt is not None
        ranges[name] = ShapeRange(tuple(low or opt), tuple(opt), tuple(high or opt), ranged=True)
    return ranges


def resolve_profile(
    inputs: Sequence[tuple[str, Sequence[int]]],
    command_line: Mapping[str, ShapeRange],
    target: Mapping[str, ShapeRange],
) -> list[ProfileInput]:
    """The profile of every dynamic input; UserError for a shape that does not fit its input."""
    names = [name for name, _ in inputs]
    for where, given in (("--shape", command_line), ("target tensorrt shapes", target)):
        for name in given:
            if name not in names:
                raise UserError(
                    f"{where} names input '{name}'{did_you_mean(name, names)}, but the model's "
                    f"inputs are: {', '.join(names)}"
                )
    profile = []
    for name, declared in inputs:
        dims = tuple(int(d) for d in declared)
        if name in command_line:
            entry = _checked(name, dims, command_line[name], "--shape")
        elif name in target:
            entry = _checked(name, dims, target[name], "target")
        else:
            entry = _default(name, dims)
        if any(d < 0 for d in dims):
            profile.append(entry)
    return profile


def _checked(name: str, declared: tuple[int, ...], given: ShapeRange, source: str) -> ProfileInput:
    if len(given.opt) != len(declared):
        raise UserError(
            f"{source} gives input '{name}' rank {len(given.opt)} ({'x'.join(map(str, given.opt))}), but "
            f"the input has rank {len(declared)} (shape {list(declared)}, -1 = dynamic)"
        )
    for axis, (d, a, b, c) in enumerate(zip(declared, given.min, given.opt, given.max, strict=True)):
        if d >= 0 and not a == b == c == d:
            raise UserError(
                f"{source}: input '{name}' dimension {axis} is fixed at {d}, but the profile gives "
                f"min {a}, opt {b}, max {c}"
            )
        if not 1 <= a <= b <= c:
            raise UserError(
                f"{source}: input '{name}' dimension {axis} needs 1 <= min <= opt <= max, "
                f"got min {a}, opt {b}, max {c}"
            )
    return ProfileInput(name, declared, given.min, given.opt, given.max, source)


def _default(name: str, declared: tuple[int, ...]) -> ProfileInput:
    unset = [axis for axis, d in enumerate(declared) if d < 0 and axis > 0]
    if unset:
        example = ",".join(
            "x".join(_example_dim(axis, d, bound) for axis, d in enumerate(declared)) for bound in range(3)
        )
        raise UserError(
            f"input '{name}' has dynamic dimension(s) {', '.join(map(str, unset))} (shape {list(declared)}, "
            f"-1 = dynamic) and TensorRT needs their range: give --shape {name}:MIN,OPT,MAX "
            f"(such as --shape {name}:{example}) or target tensorrt(min_shapes=..., opt_shapes=..., "
            "max_shapes=...); a single --shape fixes the profile at that shape"
        )
    low, opt, high = (
        tuple(size if d < 0 else d for d in declared) for size in (DYNAMIC_MIN, DYNAMIC_OPT, DYNAMIC_MAX)
    )
    return ProfileInput(name, declared, low, opt, high, "default")


def _example_dim(axis: int, declared: int, bound: int) -> str:
    """One dimension of an example MIN,OPT,MAX (bound 0, 1, 2): sizes to edit, not advice."""
    if declared >= 0:
        return str(declared)
    sizes = (DYNAMIC_MIN, DYNAMIC_OPT, DYNAMIC_MAX) if axis == 0 else (256, 512, 1024)
    return str(sizes[bound])


def failure_hint(profile: Sequence[ProfileInput]) -> str:
    """What to say after a failed build of a model with dynamic inputs: the profile used, its
    dynamic dimensions, and how to give another range."""
    if not profile:
        return ""
    lines = ["the optimization profile was:"]
    for entry in profile:
        axes = ", ".join(
            f"{axis} ({entry.min[axis]}..{entry.max[axis]}, opt {entry.opt[axis]})" for axis in entry.dynamic_axes()
        )
        lines.append(f"  {entry.describe()}; dynamic dimension(s) {axes}")
    first = profile[0]
    lines.append(
        "If a dynamic dimension's range is what failed, give the serving range as MIN,OPT,MAX: "
        f"--shape {first.name}:{'x'.join(map(str, first.min))},{'x'.join(map(str, first.opt))},"
        f"{'x'.join(map(str, first.max))} (edit the numbers), or target tensorrt(min_shapes=[...], "
        "opt_shapes=[...], max_shapes=[...])"
    )
    return "\n".join(lines)
