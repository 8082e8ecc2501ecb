"""float16 conversion: which nodes may run in half precision, and the rewrite with its Casts.

`policy` decides per node (block lists, the ONNX schemas, subgraphs, ranges seen on data, long
reductions) and says why a node stays float32; `ranges` observes activations on data;
`convert` retypes tensors and weights and places the Casts; `casts` removes redundant Casts and
checks that the ones left agree with the value types.
"""

from iropt.compress.fp16.casts import cast_problems, tidy_casts
from iropt.compress.fp16.convert import ConversionStats, convert_graph
from iropt.compress.fp16.policy import (
    DEFAULT_BLOCK_OP_TYPES,
    FP16_MAX,
    Decision,
    Policy,
    decide,
)
from iropt.compress.fp16.ranges import Observed, observe

__all__ = [
    "DEFAULT_BLOCK_OP_TYPES",
    "FP16_MAX",
    "ConversionStats",
    "Decision",
    "Observed",
    "Policy",
    "cast_problems",
    "convert_graph",
    "decide",
    "observe",
    "tidy_casts",
]
