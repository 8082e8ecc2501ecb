"""quantize(bits=4): 4-bit block-wise MatMul/Gemm weights; embedding tables in int8 per row.

The 4-bit layouts are checked against numpy: ONNX Runtime's MatMulNBits (and blocked int4
DequantizeLinear) must compute `x @ dequantize(codes)` for the codes the pass chose, which pins
the packing (nibble order, block order, zero-point packing) and the Gemm folding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers_quant import build, checked, cosine, op_counts, quantize, rand, run, write_feeds

from iropt.compress.quant.blockwise import (
    block_params,
    pack_nibbles,
    quantize_gptq,
    quantize_gptq_by_input,
    quantize_rtn,
)
from iropt.errors import OptionError
from iropt.ir.model import Model


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _nbits_weight(node_inputs: list, k: int, n: int, block: int) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node's B, scales and zero points stand for."""
    codes = _unpack(node_inputs[1].values).reshape(n, -1)[:, :k].astype(np.float32)  # [N, K]
    scales = node_inputs[2].values.reshape(n, -1)
    blocks = scales.shape[1]
    if len(node_inputs) > 3 and node_inputs[3].name:
        zeros = _unpack(node_inputs[3].values).reshape(n, -1)[:, :blocks].astype(np.float32)
    else:
        zeros = np.full((n, blocks), 8.0, dtype=np.float32)
    expand = np.repeat(np.arange(blocks), block)[:k]
    return ((codes - zeros[:, expand]) * scales[:, expand]).T


def test_round_to_nearest_is_within_half_a_step_and_keeps_each_block_extreme() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 10)).astype(np.float32)
    for symmetric in (True, False):
        q = quantize_rtn(w, 32, symmetric)
        assert q.codes.max() <= 15 and q.scale.shape == (3, 10)
        step = np.repeat(q.scale, 32, axis=0)
        assert np.all(np.abs(q.dequantize() - w) <= step / 2 * (1 + 1e-5))
    # Symmetric: one end of every block's range is a code exactly (the scale is as small as it can be).
    blocks, restored = w.reshape(3, 32, 10), quantize_rtn(w, 32, True).dequantize().reshape(3, 32, 10)
    exact = np.isclose(restored.max(axis=1), blocks.max(axis=1), rtol=1e-6) | np.isclose(
        restored.min(axis=1), blocks.min(axis=1), rtol=1e-6)
    assert exact.all()


def test_gptq_has_less_output_error_than_rounding_on_its_calibration_inputs() -> None:
    rng = np.random.default_rng(1)
    # Correlated inputs (a low-rank signal plus noise), as layer inputs in a trained network are.
    x = (rng.standard_normal((512, 8)) @ rng.standard_normal((8, 64)) + 0.1 * rng.standard_normal((512, 64)))
    w = rng.standard_normal((64, 32))
    gram = x.T @ x
    for symmetric in (True, False):
        rtn = np.linalg.norm(x @ (quantize_rtn(w, 32, symmetric).dequantize() - w))
        gptq = np.linalg.norm(x @ (quantize_gptq(w, gram, 32, symmetric).dequantize() - w))
        assert gptq < 0.7 * rtn


def _reference_gptq(w: np.ndarray, gram: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """GPTQ as the paper states it, one row at a time with every correction applied at once:
    the dequantized weight, for comparison with the batched implementation."""
    w = w.astype(np.float64).copy()
    h = gram + 0.01 * np.mean(np.diag(gram)) * np.eye(len(gram))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    restored = np.empty_like(w)
    for row in range(len(w)):
        if row % block == 0:
            scale, zero = block_params(w[row : row + block], symmetric)
        codes = np.clip(np.rint(w[row] / scale) + zero, 0, 15)
        restored[row] = (codes - zero) * scale
        w[row + 1 :] -= np.outer(upper[row, row + 1 :], (w[row] - restored[row]) / upper[row, row])
    return restored


@pytest.mark.parametrize("block", [32, 128, 256])
def test_batched_gptq_matches_one_row_at_a_time(block: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1024, 16)) @ rng.standard_normal((16, 300)) + 0.1 * rng.standard_normal((1024, 300))
    w = rng.standard_normal((300, 48))  # K not a multiple of the block or of the 128-row batch
    gram = x.T @ x
    for symmetric in (True, False):
        q = quantize_gptq(w, gram, block, symmetric)
        error = np.linalg.norm(x @ (q.dequantize() - w))
        reference = np.linalg.norm(x @ (_reference_gptq(w, gram, block, symmetric) - w))
        rtn = np.linalg.norm(x @ (quantize_rtn(w, block, symmetric).dequantize() - w))
        assert error <= rtn
        assert error == pytest.approx(reference, rel=0.02)


def test_gptq_by_input_shares_one_factorization_and_keeps_the_order() -> None:
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal((256, 64)) for _ in range(3)]
    layers = [(x.T @ x, [rng.standard_normal((64, 8 * (i + 1))) for i in range(2)]) for x in inputs]
    results = list(quantize_gptq_by_input(layers, 32, True))
    for (gram, weights), codes in zip(layers, results, strict=True):
        for weight, q in zip(weights, codes, strict=True):
            assert np.array_equal(q.codes, quantize_gptq(weight, gram, 32, True).codes)


def test_pack_nibbles_puts_the_first_code_in_the_low_nibble() -> None:
    assert pack_nibbles(np.array([[1, 2, 15, 0]], dtype=np.uint8)).tolist() == [[0x21, 0x0F]]


GEMM_TEXT = """
g (float[N, 80] x) => (float[N, 24] y, float[N, 40] z) {
  h = MatMul (x, w1)
  y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (h, w2, b2)
  z = MatMul (x, w3)
}"""


def _gemm_model(rng: np.random.Generator, opset: int = 17) -> Model:
    weights = {"w1": rand(rng, 80, 48), "w2": rand(rng, 24, 48), "b2": rand(rng, 24), "w3": rand(rng, 80, 40)}
    return build(GEMM_TEXT, weights, opset=opset)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_computes_the_chosen_codes(tmp_path: Path, symmetric: bool) -> None:
    rng = np.random.default_rng(2)
    model = _gemm_model(rng)
    original = model.copy()
    weights = {t.name: t.values for t in original.graph.tensors().values() if hasattr(t, "values")}
    calibration = write_feeds(tmp_path, {"x": rng.standard_normal((64, 80)).astype(np.float32)})
    result, _ = quantize(model, calibration, bits=4, block_size=32, symmetric=symmetric, weight_method="gptq")
    checked(model)
    assert result.stats["quantized_weights"] == 3 and op_counts(model) == {"MatMulNBits": 3}
    nodes = {node.outputs[0].name: node for node in model.graph.nodes}
    x = rng.standard_normal((5, 80)).astype(np.float32)
    w1 = _nbits_weight(nodes["h"].inputs, 80, 48, 32)  # K = 80: the last block is padded
    w2 = _nbits_weight(nodes["y"].inputs, 48, 24, 32)  # alpha folded into the scales
    w3 = _nbits_weight(nodes["z"].inputs, 80, 40, 32)
    got = run(model, {"x": x}, optimized=True)
    h = x @ w1
    np.testing.assert_allclose(got["z"], x @ w3, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["y"], h @ w2 + 2.0 * weights["b2"], rtol=1e-4, atol=1e-4)
    want = run(original, {"x": x})
    assert cosine(want["z"], got["z"]) >= 0.98 and cosine(want["y"], got["y"]) >= 0.97


def test_tensorrt_gets_blocked_int4_dequantize_linear_at_opset_21(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    older = _gemm_model(rng)
    quantize(older, None, target="tensorrt", bits=4)  # opset 17: upgraded first
    assert older.opset == 21 and sum(n.op == "DequantizeLinear" for n in older.graph.nodes) == 3
    model = _gemm_model(rng, opset=21)
    original = model.copy()
    quantize(model, None, target="tensorrt", bits=4, block_size=16)
    checked(model)
    dqs = [n for n in model.graph.nodes if n.op == "DequantizeLinear"]
    assert len(dqs) == 3 and all(n.attrs["block_size"] == 16 for n in dqs)
    gemm_dq = next(n for n in dqs if n.outputs[0].outputs[0].op == "Gemm")
    assert gemm_dq.attrs["axis"] == 1  # transB: K is the weight's second axis
    x = rng.standard_normal((5, 80)).astype(np.float32)
    want, got = run(original, {"x": x}), run(model, {"x": x})
    for name in want:
        assert cosine(want[name], got[name]) >= 0.97


def test_options_are_checked() -> None:
    with pytest.raises(OptionError, match="block_size"):
        quantize(_gemm_model(np.random.default_rng(4)), None, bits=4, block_size=48)
    with pytest.raises(OptionError, match="weight-only"):
        quantize(_gemm_model(np.random.default_rng(4)), None, bits=4, mode="dynamic")


EMBEDDING_TEXT = """
g (int64[N, 5] ids) => (float[N, 5, 64] e, float[N, 5, 1024] logits) {
  e = Gather (table, ids)
  t = Gather (shared, ids)
  shared_t = Transpose <perm = [1, 0]> (shared)
  logits = MatMul (t, shared_t)
}"""


def test_embedding_tables_become_int8_rows_unless_tied() -> None:
    rng = np.random.default_rng(5)
    # Rows of very different norms, as frequent and rare tokens have.
    table = (rng.standard_normal((2048, 64)) * rng.uniform(0.01, 3.0, (2048, 1))).astype(np.float32)
    # `shared` is also the output projection (tied weights): it stays float.
    model = build(EMBEDDING_TEXT, {"table": table, "shared": rand(rng, 1024, 64)})
    original = model.copy()
    result, _ = quantize(model, None, mode="dynamic")
    checked(model)
    assert result.stats["quantized_embeddings"] == 1
    tables = sorted(str(n.inputs[0].values.dtype) for n in model.graph.nodes if n.op == "Gather")
    assert tables == ["float32", "float32", "int8"]  # the tied table, the row scales, the int8 rows
    ids = rng.integers(0, 1024, (3, 5)).astype(np.int64)
    want, got = run(original, {"ids": ids}), run(model, {"ids": ids})
    np.testing.assert_array_equal(got["logits"], want["logits"])
    # Every looked-up row is within half a step of its own scale.
    step = np.abs(table).max(axis=1)[ids][..., None] / 127
    assert np.all(np.abs(got["e"] - table[ids]) <= step / 2 * (1 + 1e-5))


def _block_steps(table: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """Each value's quantization step in 4-bit blocks of `block` along the rows, `[V, D]`."""
    blocks = table.reshape(table.shape[0], -1, block)
    low, high = np.minimum(blocks.min(axis=2), 0), np.maximum(blocks.max(axis=2), 0)
    step = np.maximum(-low / 8, high / 7) if symmetric else (high - low) / 15
    return np.repeat(step, block, axis=1)


def _size(model: Model) -> int:
    return len(model.to_onnx().SerializeToString())


@pytest.mark.parametrize("symmetric", [True, False])
def test_embedding_tables_become_4bit_blocks_for_onnx_runtime(symmetric: bool) -> None:
    rng = np.random.default_rng(6)
    table = (rng.standard_normal((2048, 64)) * rng.uniform(0.01, 3.0, (2048, 1))).astype(np.float32)
    model = build(EMBEDDING_TEXT, {"table": table, "shared": rand(rng, 1024, 64)})
    original = model.copy()
    result, _ = quantize(model, None, bits=4, block_size=16, symmetric=symmetric)
    checked(model)
    assert result.stats["quantized_embeddings"] == 1
    gathers = [n for n in model.graph.nodes if n.op == "GatherBlockQuantized"]
    assert len(gathers) == 1 and gathers[0].attrs["block_size"] == 16
    assert (len(gathers[0].inputs) == 4) != symmetric  # zero points only when asymmetric
    ids = rng.integers(0, 1024, (3, 5)).astype(np.int64)
    want, got = run(original, {"ids": ids}), run(model, {"ids": ids})
    np.testing.assert_array_equal(got["logits"], want["logits"])  # the tied table stays float
    # Every value within half a step (symmetric: nothing clips) or one step (zero points rounded).
    bound = _block_steps(table, 16, symmetric)[ids] * (0.5 if symmetric else 1.0) * (1 + 1e-5)
    assert np.all(np.abs(got["e"] - table[ids]) <= bound)
    # 4 bits + a float scale per 16 values: the table is under a fifth of its float bytes.
    assert _size(original) - _size(model) > 0.75 * table.nbytes


def test_dynamic_mode_takes_4bit_tables_on_request_and_tensorrt_keeps_int8_rows() -> None:
    rng = np.random.default_rng(7)
    weights = {"table": rand(rng, 2048, 64), "shared": rand(rng, 1024, 64)}
    dynamic = build(EMBEDDING_TEXT, weights)
    quantize(dynamic, None, mode="dynamic", embedding_bits=4)
    assert op_counts(dynamic)["GatherBlockQuantized"] == 1
    default_dynamic = build(EMBEDDING_TEXT, weights)
    quantize(default_dynamic, None, mode="dynamic")
    assert "GatherBlockQuantized" not in op_counts(default_dynamic)
    tensorrt = build(EMBEDDING_TEXT, weights, opset=21)
    result, _ = quantize(tensorrt, None, target="tensorrt", bits=4, embedding_bits=4)
    checked(tensorrt)
    assert result.stats["quantized_embeddings"] == 1 and "GatherBlockQuantized" not in op_counts(tensorrt)
    assert any(n.op == "Gather" and n.inputs[0].values.dtype == np.int8 for n in tensorrt.graph.nodes)


@pytest.mark.parametrize(("method", "symmetric"), [("rtn", True), ("rtn", False), ("gptq", True)])
def test_a_table_tied_to_a_gemm_weight(tmp_path: Path, method: str, symmetric: bool) -> None:
    rng = np.random.default_rng(8)
    table = rand(rng, 1024, 64)
    model = build("""
g (int64[N, 3] ids) => (float[N, 3, 1024] logits, float[N, 3, 64] e) {
  e = Gather (table, ids)
  flat = Reshape (e, shape)
  flat_logits = Gemm <transB = 1> (flat, table)
  logits = Reshape (flat_logits, out_shape)
}""", {
        "table": table, "shape": np.array([-1, 64]), "out_shape": np.array([-1, 3, 1024]),
    })
    original = model.copy()
    calibration = write_feeds(tmp_path, {"ids": rng.integers(0, 1024, (16, 3))})
    result, _ = quantize(model, calibration, bits=4, block_size=32, symmetric=symmetric, weight_method=method)
    checked(model)
    assert result.stats["quantized_embeddings"] == 1 and result.stats["quantized_weights"] == 1
    floats = [t for t in model.graph.tensors().values() if hasattr(t, "values") and t.values.dtype == np.float32]
    assert all(t.values.size < table.size for t in floats)  # the float table is gone
    ids = rng.integers(0, 1024, (7, 3)).astype(np.int64)
    want, got = run(original, {"ids": ids}), run(model, {"ids": ids}, optimized=True)
    bound = _block_steps(table, 32, symmetric)[ids] * (0.5 if symmetric else 1.0) * (1 + 1e-5)
    assert np.all(np.abs(got["e"] - want["e"]) <= bound)
    assert cosine(got["logits"], want["logits"]) >= 0.98
    gather = next(n for n in model.graph.nodes if n.op == "GatherBlockQuantized")
    matmul = next(n for n in model.graph.nodes if n.op == "MatMulNBits")
    if method == "rtn":
        # The lookup reads the Gemm's own 4-bit bytes: the codes once (1/8 of float), only the
        # scales (1/32 each) and zero points twice, in each node's layout.
        assert gather.inputs[0] is matmul.inputs[1]
        assert _size(model) < 0.22 * _size(original)
    else:
        # GPTQ's codes serve the projection, not the lookup: each use has its own copy.
        assert gather.inputs[0] is not matmul.inputs[1]
        assert _size(model) < 0.35 * _size(original)


def test_a_table_with_an_odd_row_length_stays_int8_rows() -> None:
    rng = np.random.default_rng(9)
    model = build("""
g (int64[N] ids) => (float[N, 65] e) {
  e = Gather (table, ids)
}""", {"table": rand(rng, 1100, 65)})
    result, _ = quantize(model, None, bits=4)
    checked(model)
    assert result.stats["quantized_embeddings"] == 1 and "GatherBlockQuantized" not in op_counts(model)


def test_accuracy_level_reaches_matmul_nbits() -> None:
    rng = np.random.default_rng(10)
    model = _gemm_model(rng)
    original = model.copy()
    quantize(model, None, bits=4, accuracy_level=4)
    checked(model)
    assert {n.attrs["accuracy_level"] for n in model.graph.nodes} == {4}
    x = rng.standard_normal((5, 80)).astype(np.float32)
    want, got = run(original, {"x": x}), run(model, {"x": x}, optimized=True)
    for name in want:
        assert cosine(want[name], got[name]) >= 0.97
    with pytest.raises(OptionError, match="accuracy_level"):
        quantize(_gemm_model(rng), None, bits=4, accuracy_level=5)
