"""`edgert verify`: a converted package against a float model built from its source.

The reference model has the package's architecture and, for every tensor, the source's own
dequantization in float32 (gguf-py's for GGUF, the GPTQ/AWQ formula, the float weights of a
float checkpoint; see `TensorRecord.reference`). Both run the same prompts; per position we
compare the next-token distributions: top-1 agreement, KL(reference || package) and the
largest absolute logit difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import EdgertError, UnsupportedError

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes, the boiling point",
)


@dataclass
class Verdict:
    positions: int
    top1_agreement: float  # fraction of positions where both argmaxes agree
    kl_mean: float  # mean over positions of KL(reference || package), nats
    kl_max: float
    max_abs_logit_error: float
    min_top1: float
    max_kl: float

    @property
    def passed(self) -> bool:
        return self.top1_agreement >= self.min_top1 and self.kl_mean <= self.max_kl

    def as_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def reference_model(config: dict, source: str | Path) -> nn.Module:
    """The package's architecture with float32 weights from the source's own dequantization."""
    from .convert.api import read_source
    from .models import get_classes

    if "bitnet" in config:
        raise UnsupportedError("verify: BitNet packages have no float reference (their "
                               "activations are quantized too)")
    config = {k: v for k, v in config.items() if k != "quantization"}
    model_cls, args_cls = get_classes(config["model_type"])
    model = model_cls(args_cls.from_dict(config))
    weights = {}
    for record in read_source(Path(source), requantize=True).tensors():  # references only
        if record.name.endswith(".input_perm"):
            continue  # the reference keeps the source's column order
        try:
            weights[record.name] = mx.array(record.reference_value())
        except ValueError as e:
            raise UnsupportedError(f"verify: {e}") from None
    weights = model.sanitize(weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise EdgertError(f"verify: the source does not match the package ({e})") from None
    model.activation_dtype = mx.float32
    mx.eval(model.parameters())
    model.eval()
    return model


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare(ref_logits: list[np.ndarray], pkg_logits: list[np.ndarray], min_top1: float,
            max_kl: float) -> Verdict:
    """Per-position metrics over all prompts; each array is (T, vocab) float32."""
    ref, pkg = np.concatenate(ref_logits), np.concatenate(pkg_logits)  # (N, V)
    lp, lq = _log_softmax(ref.astype(np.float64)), _log_softmax(pkg.astype(np.float64))
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)  # (N,)
    return Verdict(positions=len(ref),
                   top1_agreement=float((ref.argmax(-1) == pkg.argmax(-1)).mean()),
                   kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                   max_abs_logit_error=float(np.abs(ref - pkg).max()),
                   min_top1=min_top1, max_kl=max_kl)


def verify(package: str | Path, source: str | Path, prompts: tuple[str, ...] = PROMPTS,
           min_top1: float = 0.9, max_kl: float = 0.05) -> Verdict:
    """Run `package` and the float reference from `source` on `prompts` and compare."""
    from .convert.api import ensure_package
    from .package import load_model
    from .tokenizer import load_tokenizer

    path = ensure_package(package)
    model, config = load_model(path)
    try:
        encode = load_tokenizer(path).encode
    except EdgertError:  # a weights-only package: fixed pseudo-random token ids instead
        vocab = config["vocab_size"]
        encode = lambda text: np.random.default_rng(len(text)).integers(0, vocab, 32).tolist()  # noqa: E731
    reference = reference_model(config, source)
    ref_logits, pkg_logits = [], []
    for text in prompts:
        ids = mx.array([encode(text)])  # (1, T)
        if ids.size == 0:
            raise EdgertError("verify: a prompt tokenized to nothing")
        ref_logits.append(np.array(reference(ids)[0].astype(mx.float32)))
        pkg_logits.append(np.array(model(ids)[0].astype(mx.float32)))
    return compare(ref_logits, pkg_logits, min_top1, max_kl)
