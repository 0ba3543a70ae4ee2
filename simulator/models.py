"""Sample models made bigger: a scenario's bundle can weigh what a real model weighs.

The digits samples are a few KiB, so a download is one frame and a dropped
link can never interrupt one. :func:`padded_model` adds an unused initializer
of random (incompressible) bytes: the graph, its inputs, outputs and answers
are unchanged, the file and the sealed bundle grow by ``megabytes``.
onnxruntime drops the unused initializer when it loads the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["padded_model"]

MAX_PADDING_MB = 512


def padded_model(source: Path, dest: Path, megabytes: float, *, seed: int = 0) -> Path:
    """Write ``source`` plus ``megabytes`` MiB of unused weights to ``dest``; return ``dest``."""
    import onnx
    from onnx import numpy_helper

    if not 0 < megabytes <= MAX_PADDING_MB:
        raise ValueError(f"padding must be in (0, {MAX_PADDING_MB}] MiB, not {megabytes}")
    model = onnx.load(str(source))
    count = int(megabytes * 1024 * 1024 / 4)
    padding = np.random.default_rng(seed).standard_normal(count, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(padding, "edgeota_padding"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest
