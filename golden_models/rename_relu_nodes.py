from dataclasses import dataclass

from iropt import Model, Pass, PassContext, PassResult, register_pass
from iropt.ir.graph import is_op


@register_pass("rename_relu_nodes")
@dataclass(kw_only=True)
class RenameReluNodes(Pass):
    """Give every Relu node a name with a prefix (a toy pass: names only, exact)."""

    prefix: str = "relu_"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        renamed = 0
        for index, node in enumerate(n for n in model.graph.nodes if is_op(n, "Relu")):
            node.name = f"{self.prefix}{index}"
            renamed += 1
        return PassResult.from_stats(renamed=renamed)
