"""The schedule language: grammar, parser to AST, printer, resolver to a Pipeline.

    # comment
    target ort(providers=["CPUExecutionProvider"], intra_op_threads=1)
    fixpoint(max=8) {
      fold_constants(max_bytes=1MiB)
      eliminate_identity
    }
    repeat(2) { eliminate_dead_code }
    verify(metric="cosine", min=0.995)

- `parse_schedule(text, filename)` -> `Schedule` AST (syntax only; see `ast.py`).
- `print_schedule(ast)` -> canonical text; `parse_schedule(print_schedule(ast)) == ast`.
- `resolve(ast)` -> `iropt.infra.pipeline.Pipeline`, names and options checked against the registries.
- `load_schedule(path_or_builtin_name)` -> `Pipeline` (`check_schedule` is the same, for
  `iropt check`).
- Every error is a `ScheduleError` (a `UserError`) quoting `file:line:col` with a caret.
"""

from .ast import (
    Fixpoint,
    Option,
    PassCall,
    Position,
    Repeat,
    Schedule,
    Size,
    Statement,
    Target,
    Value,
    Verify,
)
from .errors import Diagnostic, ScheduleError
from .loader import check_schedule, load_schedule, parse_schedule_file, read_schedule
from .parser import parse_schedule
from .printer import format_value, print_schedule
from .resolver import plain_value, resolve

__all__ = [
    "Diagnostic",
    "Fixpoint",
    "Option",
    "PassCall",
    "Position",
    "Repeat",
    "Schedule",
    "ScheduleError",
    "Size",
    "Statement",
    "Target",
    "Value",
    "Verify",
    "check_schedule",
    "format_value",
    "load_schedule",
    "parse_schedule",
    "parse_schedule_file",
    "plain_value",
    "print_schedule",
    "read_schedule",
    "resolve",
]
