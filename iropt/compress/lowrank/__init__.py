"""Low-rank factorization of Gemm, MatMul and Conv layers with constant weights.

`layers` finds the layers and reads each weight as a K x N matrix acting on its input,
`moments` streams the input statistics the data-aware method needs, `factorize` computes the
spectra and factors, `ranks` chooses a rank per layer, `rewrite` puts the factors in the graph.
"""
