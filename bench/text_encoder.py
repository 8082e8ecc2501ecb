"""A small transformer encoder trained on real text, exported to ONNX: for the compression benches.

The text is Python's own bundled documentation (`pydoc_data.topics`, about 460k characters of
the language reference), read byte by byte (vocabulary 256). The encoder is trained as a masked
language model (15% of the bytes masked, predict them) for a fixed number of steps with a fixed
seed, then exported without its prediction head, so the ONNX graph maps token ids `[B, S]` to
hidden states `[B, S, d]` after the final LayerNormalization. Attention is written out (Linear
q/k/v, Reshape/Transpose head split, MatMul, Softmax), so the graph holds the MatMul weights that
pruning and low-rank factorization work on; GELU is exact (Erf), as the TorchScript exporter
writes it for opset 17.

    from bench.text_encoder import build_text_encoder
    paths = build_text_encoder(Path("out/bench_cache"))   # trains once, then reuses the files
    paths.model, paths.calibration, paths.test             # .onnx, .npz {"ids"}, .npz {"ids"}

The first 90% of the text trains the model and gives the calibration windows; the last 10% gives
the test windows. Run it alone to build (or rebuild with --force) the cached files.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

MASK_ID = 0  # byte 0 never occurs in the documentation text


@dataclass(frozen=True)
class EncoderConfig:
    width: int = 128
    heads: int = 4
    hidden: int = 512
    layers: int = 2
    seq: int = 64
    steps: int = 300
    batch: int = 32
    seed: int = 0

    def key(self) -> str:
        return "text_encoder_" + "_".join(f"{k}{v}" for k, v in asdict(self).items())


@dataclass(frozen=True)
class EncoderFiles:
    model: Path
    calibration: Path
    test: Path
    meta: dict[str, Any]


def corpus() -> np.ndarray:
    """The bundled documentation as bytes (uint8), topics in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return data[data != MASK_ID]


def windows(data: np.ndarray, seq: int, count: int, seed: int) -> np.ndarray:
    """`count` random windows of `seq` bytes as int64 ids."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq, size=count)
    return np.stack([data[s:s + seq] for s in starts]).astype(np.int64)


def _modules(config: EncoderConfig) -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d = config.width
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, config.hidden), nn.Linear(config.hidden, d)

        def split(self, x: Any) -> Any:
            b, s, _ = x.shape
            return x.reshape(b, s, config.heads, config.width // config.heads).transpose(1, 2)

        def forward(self, x: Any) -> Any:
            h = self.ln1(x)
            q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
            scores = q @ k.transpose(-1, -2) / (config.width // config.heads) ** 0.5
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
            x = x + self.o(context)
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(256, config.width)
            self.position = nn.Parameter(torch.randn(config.seq, config.width) * 0.02)
            self.blocks = nn.ModuleList(Block() for _ in range(config.layers))
            self.norm = nn.LayerNorm(config.width)

        def forward(self, ids: Any) -> Any:
            x = self.embed(ids) + self.position
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    return Encoder


def train(config: EncoderConfig, data: np.ndarray) -> tuple[Any, float]:
    """Train the encoder with a masked-byte objective; returns it and the final masked accuracy."""
    import torch

    torch.manual_seed(config.seed)
    encoder = _modules(config)()
    head = torch.nn.Linear(config.width, 256)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=config.steps)
    rng = np.random.default_rng(config.seed)
    accuracy = 0.0
    for step in range(config.steps):
        ids = torch.from_numpy(windows(data, config.seq, config.batch, int(rng.integers(2**31))))
        mask = torch.rand(ids.shape) < 0.15
        logits = head(encoder(ids.masked_fill(mask, MASK_ID)))
        loss = torch.nn.functional.cross_entropy(logits[mask], ids[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= config.steps - 20:
            accuracy += float((logits[mask].argmax(-1) == ids[mask]).float().mean()) / 20
    return encoder.eval(), accuracy


def export(encoder: Any, config: EncoderConfig, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder, (torch.zeros(2, config.seq, dtype=torch.int64),), str(path), dynamo=False,
            opset_version=17, input_names=["ids"], output_names=["hidden"],
            dynamic_axes={"ids": {0: "batch"}, "hidden": {0: "batch"}},
        )


def build_text_encoder(cache: Path, config: EncoderConfig = EncoderConfig(), *, force: bool = False) -> EncoderFiles:
    """Train and export once; later calls reuse the cached files."""
    folder = cache / config.key()
    files = EncoderFiles(folder / "model.onnx", folder / "calib.npz", folder / "test.npz", {})
    meta_path = folder / "meta.json"
    if not force and meta_path.exists() and files.model.exists():
        return EncoderFiles(files.model, files.calibration, files.test, json.loads(meta_path.read_text()))
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    data = corpus()
    split = int(len(data) * 0.9)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(2)
        encoder, accuracy = train(config, data[:split])
    finally:
        torch.set_num_threads(threads)
    export(encoder, config, files.model)
    np.savez(files.calibration, ids=windows(data[:split], config.seq, 256, seed=1))
    np.savez(files.test, ids=windows(data[split:], config.seq, 128, seed=2))
    meta = {"masked_byte_accuracy": round(accuracy, 4), "train_seconds": round(time.perf_counter() - start, 1),
            "config": asdict(config), "text_bytes": len(data)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return EncoderFiles(files.model, files.calibration, files.test, meta)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench_cache"))
    parser.add_argument("--steps", type=int, default=EncoderConfig.steps)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    built = build_text_encoder(args.cache, EncoderConfig(steps=args.steps), force=args.force)
    print(built.model, json.dumps(built.meta))
