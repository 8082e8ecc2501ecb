"""Third-party-style models for the benches: trained here, on text-like images made from real data.

Users bring models such as PaddleOCR's text-direction classifier (a depthwise MobileNetV3 with
HardSwish and squeeze-excitation) and its DBNet text detector (a MobileNetV3 backbone, an FPN
neck with nearest-neighbour upsampling, and a head of ConvTranspose layers ending in a per-pixel
probability). The golden models are too small to show how iropt does on those, so this module
builds two networks of the same architecture family and trains them on CPU:

- `text_direction`: input `[batch, 3, 48, 192]` (PaddleOCR's classifier size), output logits for
  "upright" / "upside down" text lines;
- `text_detector`: input `[batch, 3, 320, 320]` (trained on 128x128 crops; it is fully
  convolutional), output `[batch, 1, 320, 320]`, the probability of text at each pixel.

Data: lines of English text (Python's bundled help topics, `pydoc_data`) in Pillow's bundled
font, written dark-on-light with random size, colour and contrast over crops of scikit-learn's
two bundled photos (`china.jpg`, `flower.jpg`). Calibration and test sets are drawn the same way from other seeds, so they are
"text-like calibration images" for the quantizer, disjoint from the training images.

API (for bench scripts): `build(name) -> ZooModel` (cached under `~/.cache/iropt/zoo/` or `$IROPT_ZOO_DIR`,
rebuilt when missing; training takes about 10 minutes for the classifier and 25 for the detector on two cores), `ZooModel.calibration(count)` and
`ZooModel.test(count)` (float32 arrays for the model's `input`), `NAMES`. Command line:
`.venv/bin/python bench/zoo.py [--name NAME] [--force]`.
Needs the `torch` extra, scikit-learn and Pillow (the `dev` extra).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Trained models are cached per user, outside the checkout, so every checkout on a machine shares them.
CACHE = Path(
    os.environ.get("IROPT_ZOO_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "iropt" / "zoo"
)
OPSET = 17
NAMES = ("text_direction", "text_detector")


# --------------------------------------------------------------------------------------------
# Text-like images from real data
# --------------------------------------------------------------------------------------------


def _sources() -> tuple[list[str], list[np.ndarray]]:
    """Words of English text (Python's bundled help topics) and the two photos in [0, 1] (`[h, w, 3]`)."""
    from pydoc_data.topics import topics

    from sklearn.datasets import load_sample_images

    words = [
        word for key in sorted(topics) for word in topics[key].split() if word.isascii() and len(word) < 14
    ]
    photos = [image.astype(np.float32) / 255.0 for image in load_sample_images().images]
    return words, photos


def _background(photos: list[np.ndarray], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random crop of a photo, lightened so that dark text on it stays readable."""
    photo = photos[rng.integers(len(photos))]
    top = rng.integers(0, photo.shape[0] - height)
    left = rng.integers(0, photo.shape[1] - width)
    crop = photo[top : top + height, left : left + width]
    return 0.45 + 0.55 * crop * rng.uniform(0.6, 1.0)


def _text_line(words: list[str], rng: np.random.Generator, height: int, max_width: int) -> np.ndarray:
    """Ink coverage in [0, 1] of a run of consecutive words, about `height` pixels high, cut to
    `max_width` (Pillow's bundled scalable font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=height)
    start = int(rng.integers(len(words) - 12))
    text = " ".join(words[start : start + int(rng.integers(1, 12))])
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (max(1, int(right - left)), max(1, int(bottom - top))), 0)
    ImageDraw.Draw(canvas).text((-left, -top), text, fill=255, font=font)
    return np.asarray(canvas, np.float32)[:, :max_width] / 255.0


def _ink(image: np.ndarray, coverage: np.ndarray, top: int, left: int, rng: np.random.Generator) -> None:
    """Darkens `image` (HWC) where `coverage` has ink, in a random ink colour, in place."""
    colour = rng.uniform(0.0, 0.3, size=3).astype(np.float32)
    h, w = coverage.shape
    region = image[top : top + h, left : left + w]
    alpha = np.clip(coverage * rng.uniform(0.7, 1.0), 0, 1)[..., None]
    region[...] = region * (1 - alpha) + colour * alpha


def direction_samples(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` text-line images `[n, 3, 48, 192]` and labels (1: upside down)."""
    words, photos = _sources()
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, 48, 192), np.float32)
    labels = rng.integers(0, 2, size=count)
    for index in range(count):
        image = _background(photos, rng, 48, 192)
        line = _text_line(words, rng, int(rng.integers(20, 36)), 188)
        _ink(
            image,
            line,
            int(rng.integers(0, 48 - line.shape[0] + 1)),
            int(rng.integers(0, 192 - line.shape[1] + 1)),
            rng,
        )
        if labels[index]:
            image = image[::-1, ::-1]
        images[index] = image.transpose(2, 0, 1)
    return _normalize(images), labels.astype(np.int64)


def detector_samples(count: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` scenes `[n, 3, size, size]` with 1-5 text lines each, and their text masks."""
    words, photos = _sources()
    rng = np.random.default_rng(seed)
    images = np.empty((count, 3, size, size), np.float32)
    masks = np.zeros((count, 1, size, size), np.float32)
    for index in range(count):
        image = _background(photos, rng, size, size)
        for _ in range(int(rng.integers(1, 6))):
            line = _text_line(words, rng, int(rng.integers(max(8, size // 24), max(10, size // 8))), size - 2)
            height, width = line.shape
            top = int(rng.integers(0, size - height))
            left = int(rng.integers(0, size - width))
            _ink(image, line, top, left, rng)
            # The text region as DBNet labels it: the line's box, a little shrunk.
            pad = max(1, height // 8)
            masks[index, 0, top + pad : top + height - pad, left + pad : left + width - pad] = 1.0
        images[index] = image.transpose(2, 0, 1)
    return _normalize(images), masks


def _normalize(images: np.ndarray) -> np.ndarray:
    """PaddleOCR's input normalization: (x - 0.5) / 0.5."""
    return ((images - 0.5) / 0.5).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Networks (MobileNetV3 blocks)
# --------------------------------------------------------------------------------------------


def _networks() -> dict[str, Callable[[], object]]:
    import torch
    from torch import nn

    class SqueezeExcite(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            hidden = max(8, channels // 4)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce = nn.Conv2d(channels, hidden, 1)
            self.expand = nn.Conv2d(hidden, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
            return x * scale

    def conv_bn(
        cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: str | None = "relu"
    ) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act == "relu":
            layers.append(nn.ReLU())
        elif act == "hswish":
            layers.append(nn.Hardswish())
        return nn.Sequential(*layers)

    class Bottleneck(nn.Module):
        """MobileNetV3's inverted residual: 1x1 expand, depthwise, optional SE, 1x1 project."""

        def __init__(
            self, cin: int, expand: int, cout: int, kernel: int, stride: int, se: bool, act: str
        ) -> None:
            super().__init__()
            self.residual = stride == 1 and cin == cout
            self.body = nn.Sequential(
                conv_bn(cin, expand, 1, act=act),
                conv_bn(expand, expand, kernel, stride, groups=expand, act=act),
                SqueezeExcite(expand) if se else nn.Identity(),
                conv_bn(expand, cout, 1, act=None),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.body(x)
            return x + out if self.residual else out

    # (cin, expand, cout, kernel, stride, se, act): MobileNetV3-small at about half width.
    small = [
        (16, 16, 16, 3, 2, True, "relu"),
        (16, 48, 24, 3, 2, False, "relu"),
        (24, 56, 24, 3, 1, False, "relu"),
        (24, 96, 40, 5, 2, True, "hswish"),
        (40, 120, 40, 5, 1, True, "hswish"),
        (40, 120, 48, 5, 1, True, "hswish"),
        (48, 144, 48, 5, 1, True, "hswish"),
        (48, 192, 96, 5, 2, True, "hswish"),
    ]

    class DirectionClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 16, 3, 2, act="hswish")
            self.blocks = nn.Sequential(*(Bottleneck(*spec) for spec in small))
            self.last = conv_bn(96, 288, 1, act="hswish")
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(288, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))

    # Backbone stages of the detector, each ending at stride 4, 8, 16, 32.
    stages = [
        [
            (16, 16, 16, 3, 1, False, "relu"),
            (16, 64, 24, 3, 2, False, "relu"),
            (24, 72, 24, 3, 1, False, "relu"),
        ],
        [(24, 72, 40, 5, 2, True, "relu"), (40, 120, 40, 5, 1, True, "relu")],
        [
            (40, 240, 80, 3, 2, False, "hswish"),
            (80, 200, 80, 3, 1, False, "hswish"),
            (80, 480, 112, 3, 1, True, "hswish"),
        ],
        [(112, 672, 160, 5, 2, True, "hswish"), (160, 960, 160, 5, 1, True, "hswish")],
    ]
    inner = 64

    class TextDetector(nn.Module):
        """DBNet: MobileNetV3 backbone, FPN neck (1x1 lateral, upsample + add, 3x3 smooth,
        upsample all to stride 4, concat), probability head (3x3 conv, two 2x2 stride-2
        ConvTranspose, Sigmoid)."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = conv_bn(3, 16, 3, 2, act="hswish")
            self.stages = nn.ModuleList(
                nn.Sequential(*(Bottleneck(*spec) for spec in stage)) for stage in stages
            )
            self.lateral = nn.ModuleList(nn.Conv2d(stage[-1][2], inner, 1, bias=False) for stage in stages)
            self.smooth = nn.ModuleList(
                nn.Conv2d(inner, inner // 4, 3, padding=1, bias=False) for _ in stages
            )
            self.head = nn.Sequential(
                conv_bn(inner, inner // 4, 3),
                nn.ConvTranspose2d(inner // 4, inner // 4, 2, 2),
                nn.BatchNorm2d(inner // 4),
                nn.ReLU(),
                nn.ConvTranspose2d(inner // 4, 1, 2, 2),
                nn.Sigmoid(),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            features = []
            out = self.stem(x)
            for stage in self.stages:
                out = stage(out)
                features.append(out)
            laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
            for level in range(len(laterals) - 2, -1, -1):
                laterals[level] = laterals[level] + nn.functional.interpolate(
                    laterals[level + 1], scale_factor=2.0, mode="nearest"
                )
            smoothed = [conv(f) for conv, f in zip(self.smooth, laterals, strict=True)]
            upsampled = [
                nn.functional.interpolate(f, scale_factor=float(2**level), mode="nearest") if level else f
                for level, f in enumerate(smoothed)
            ]
            return self.head(torch.cat(upsampled, dim=1))

    return {"text_direction": DirectionClassifier, "text_detector": TextDetector}


# --------------------------------------------------------------------------------------------
# Training and export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    train: Callable[[int, int], tuple[np.ndarray, np.ndarray]]  # (count, seed) -> inputs, targets
    export_shape: tuple[int, ...]
    output: str
    samples: int
    epochs: int
    batch: int
    lr: float
    evaluate: Callable[[np.ndarray, np.ndarray], str]


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> str:
    return f"accuracy {float(np.mean(logits.argmax(1) == labels)):.3f}"


def _f1(probability: np.ndarray, masks: np.ndarray) -> str:
    predicted, truth = probability > 0.5, masks > 0.5
    true_positive = float(np.sum(predicted & truth))
    f1 = 2 * true_positive / max(1.0, float(np.sum(predicted) + np.sum(truth)))
    return f"pixel F1 {f1:.3f}"


RECIPES = {
    "text_direction": Recipe(direction_samples, (1, 3, 48, 192), "logits", 2000, 3, 32, 3e-3, _accuracy),
    "text_detector": Recipe(
        lambda count, seed: detector_samples(count, seed, 128),
        (1, 3, 320, 320),
        "probability",
        800,
        4,
        16,
        3e-3,
        _f1,
    ),
}
# Calibration and test sets: other seeds, at the exported input size.
CALIBRATION_SEED, TEST_SEED, TRAIN_SEED = 101, 202, 7


def _samples(name: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "text_detector":
        return detector_samples(count, seed, RECIPES[name].export_shape[-1])
    return RECIPES[name].train(count, seed)


def _train(name: str) -> tuple[object, str]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    recipe = RECIPES[name]
    net = _networks()[name]()
    inputs, targets = recipe.train(recipe.samples, TRAIN_SEED)
    optimizer = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)  # type: ignore[attr-defined]
    steps = recipe.epochs * (len(inputs) // recipe.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss() if name == "text_direction" else torch.nn.BCELoss()
    net.train()  # type: ignore[attr-defined]
    order_rng = np.random.default_rng(1)
    for _ in range(recipe.epochs):
        order = order_rng.permutation(len(inputs))
        for start in range(0, len(order) - recipe.batch + 1, recipe.batch):
            index = order[start : start + recipe.batch]
            optimizer.zero_grad()
            loss = loss_fn(net(torch.from_numpy(inputs[index])), torch.from_numpy(targets[index]))  # type: ignore[operator]
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()  # type: ignore[attr-defined]
    test_inputs, test_targets = _samples(name, 64, TEST_SEED)
    with torch.no_grad():
        predicted = net(torch.from_numpy(test_inputs)).numpy()  # type: ignore[operator]
    return net, recipe.evaluate(predicted, test_targets)


def _export(name: str, net: object, path: Path) -> None:
    import onnx
    import torch

    recipe = RECIPES[name]
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        staged = Path(tmp) / "model.onnx"
        # TorchScript export as PaddleOCR's paddle2onnx graphs look: BatchNormalization kept, dynamic batch.
        torch.onnx.export(
            net,
            (torch.zeros(recipe.export_shape),),
            staged,
            dynamo=False,
            opset_version=OPSET,
            training=torch.onnx.TrainingMode.EVAL,
            do_constant_folding=False,
            input_names=["input"],
            output_names=[recipe.output],
            dynamic_axes={"input": {0: "batch"}, recipe.output: {0: "batch"}},
        )
        model = onnx.load(str(staged))
    model.graph.name = name
    onnx.save(model, str(path))


@dataclass(frozen=True)
class ZooModel:
    name: str
    path: Path
    summary: str  # the held-out metric measured after training

    def calibration(self, count: int) -> np.ndarray:
        return _samples(self.name, count, CALIBRATION_SEED)[0]

    def test(self, count: int) -> np.ndarray:
        return _samples(self.name, count, TEST_SEED)[0]


def build(name: str, force: bool = False, log: Callable[[str], None] | None = None) -> ZooModel:
    """The trained model `name` (one of NAMES), from the cache or trained and exported now."""
    if name not in RECIPES:
        raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")
    CACHE.mkdir(exist_ok=True)
    path, summary_path = CACHE / f"{name}.onnx", CACHE / f"{name}.txt"
    if force or not path.exists() or not summary_path.exists():
        start = time.perf_counter()
        net, summary = _train(name)
        # Written under temporary names and renamed, so a concurrent reader never sees half a model.
        staged = path.with_suffix(f".{os.getpid()}.tmp")
        _export(name, net, staged)
        staged.replace(path)
        staged_summary = summary_path.with_suffix(f".{os.getpid()}.tmp")
        staged_summary.write_text(summary + "\n")
        staged_summary.replace(summary_path)
        if log is not None:
            log(f"{name}: trained in {time.perf_counter() - start:.0f} s, {summary}")
    return ZooModel(name, path, summary_path.read_text().strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", choices=NAMES, action="append", help="model(s) to build (default: all)")
    parser.add_argument("--force", action="store_true", help="retrain even when cached")
    args = parser.parse_args()
    for name in args.name or NAMES:
        model = build(name, force=args.force, log=lambda line: print(line, file=sys.stderr))
        print(f"{model.name}: {model.path} ({model.path.stat().st_size / 2**20:.1f} MiB), {model.summary}")


if __name__ == "__main__":
    main()
