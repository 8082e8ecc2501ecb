"""BERT-style sentence encoders exported from PyTorch, for the latency checks of bench/peers.py.

A post-norm encoder (embeddings + LayerNorm, self-attention and GELU feed-forward blocks, each
closed by a residual Add and LayerNormalization; mean pooling under the attention mask),
exported by the TorchScript exporter with dynamic batch and sequence axes, as sentence
embedding models are. Weights are random (seed 0): only the graph's shape matters here. Each
model is written with `NAME.inputs.npz` (batch 1 or 8, 64 tokens) beside it, which the bench
feeds instead of generated inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

VOCAB, HIDDEN, HEADS, FFN, LAYERS, TOKENS = 1000, 256, 4, 1024, 2, 64


def _encoder() -> object:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.up, self.down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            batch, length, _ = x.shape
            head = HIDDEN // HEADS

            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, length, HEADS, head).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            attention = ((q @ k.transpose(-1, -2)) / math.sqrt(head) + mask).softmax(-1) @ v
            x = self.norm1(x + self.o(attention.transpose(1, 2).reshape(batch, length, HIDDEN)))
            return self.norm2(x + self.down(nn.functional.gelu(self.up(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(128, HIDDEN)
            self.norm = nn.LayerNorm(HIDDEN)
            self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

        def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            x = self.norm(self.tokens(ids) + self.positions(positions))
            mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
            for block in self.blocks:
                x = block(x, mask)
            keep = attention_mask.unsqueeze(-1).float()
            return (x * keep).sum(1) / keep.sum(1)

    torch.manual_seed(0)
    return Encoder().eval()


def encoder_models(folder: Path) -> list[Path]:
    """`bert_encoder_b1.onnx` and `bert_encoder_b8.onnx` (one model, two input batches) in
    `folder`, built once; empty when torch is not installed."""
    try:
        import torch
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for batch in (1, 8):
        path = folder / f"bert_encoder_b{batch}.onnx"
        rng = np.random.default_rng(batch)
        feeds = {
            "input_ids": rng.integers(0, VOCAB, (batch, TOKENS), dtype=np.int64),
            "attention_mask": np.ones((batch, TOKENS), dtype=np.int64),
        }
        if not path.exists():
            example = tuple(torch.from_numpy(v) for v in feeds.values())
            axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                    "embedding": {0: "batch"}}
            torch.onnx.export(_encoder(), example, str(path), input_names=list(feeds), output_names=["embedding"],
                              dynamic_axes=axes, opset_version=17, dynamo=False)
        np.savez(path.with_suffix(".inputs.npz"), **feeds)
        paths.append(path)
    return paths
