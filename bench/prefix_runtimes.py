"""Which runtime runs the frozen prefix of the body fastest on this CPU: PyTorch eager (what the
features pass ran before), onnxruntime on an export of the BatchNorm-folded prefix, and
``torch.jit.freeze`` + ``optimize_for_inference`` (oneDNN); same pixels, same process.

The runtimes are interleaved pass by pass (``--rounds``), so a machine busy with other work slows
them alike: compare the ratios, not the seconds. Prints one JSON object::

    nice -n 10 .venv/bin/python bench/prefix_runtimes.py --images 256 --stages 2 4 --batch-sizes 8 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from common import SAMPLE
from pneumo.data.cache import decode_images
from pneumo.data.folders import is_image_file
from pneumo.nets.models import create_model
from pneumo.training.features import fold_batchnorm


def films(n: int, size: int) -> np.ndarray:
    paths = sorted(p for p in SAMPLE.rglob("*") if is_image_file(p))
    pixels = np.asarray(decode_images(paths, size, progress=False, use_cache=False).pixels)
    return np.concatenate([pixels] * -(-n // len(pixels)))[:n]


def prefix_module(model: torch.nn.Module, stages: int) -> torch.nn.Module:
    class Prefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.features_before(x, stages)

    return Prefix().eval()


def runners(model: torch.nn.Module, stages: int, size: int, tmp: Path) -> tuple[dict[str, Callable], dict]:
    """name -> f(float batch (N, 1, S, S) in [0, 1]) -> numpy features; and each one's setup seconds."""
    import onnxruntime as ort

    prefix = prefix_module(model, stages)
    setup: dict[str, float] = {}
    out: dict[str, Callable] = {}

    @torch.inference_mode()
    def eager(x: torch.Tensor) -> np.ndarray:
        return prefix(x.contiguous(memory_format=torch.channels_last)).numpy()

    out["torch_eager"] = eager
    example = torch.rand(2, 1, size, size)
    t0 = time.perf_counter()
    with torch.no_grad():
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(prefix, example)))
    setup["torch_jit_freeze"] = time.perf_counter() - t0

    @torch.inference_mode()
    def jit(x: torch.Tensor) -> np.ndarray:
        return frozen(x).numpy()

    out["torch_jit_freeze"] = jit
    for dynamo in (False, True):
        name = "onnxruntime" + ("_dynamo" if dynamo else "_legacy")
        path = tmp / f"{name}-{stages}.onnx"
        t0 = time.perf_counter()
        try:
            kw = dict(dynamic_shapes={"x": {0: torch.export.Dim("batch")}}) if dynamo else {}
            torch.onnx.export(
                prefix,
                (example,),
                str(path),
                input_names=["x"],
                output_names=["f"],
                opset_version=18,
                dynamo=dynamo,
                dynamic_axes=None if dynamo else {"x": {0: "n"}, "f": {0: "n"}},
                **kw,
            )
        except Exception as exc:  # noqa: BLE001 - report and go on
            setup[name] = f"export failed: {type(exc).__name__}: {str(exc)[:200]}"
            continue
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        setup[name] = time.perf_counter() - t0

        def run(x: torch.Tensor, session=session) -> np.ndarray:
            return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

        out[name] = run
    return out, setup


def measure(stages: int, pixels: np.ndarray, batch_sizes: Sequence[int], rounds: int, tmp: Path) -> dict:
    size = pixels.shape[-1]
    model = create_model("efficientnet_lite0", 2, "imagenet").eval()
    model = fold_batchnorm(model.to(memory_format=torch.channels_last))
    fns, setup = runners(model, stages, size, tmp)
    x = torch.from_numpy(pixels).unsqueeze(1).float().div_(255)
    reference = fns["torch_eager"](x[:64])
    diffs = {name: float(np.abs(fn(x[:64]) - reference).max()) for name, fn in fns.items()}
    times: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in batch_sizes} for name in fns}
    for _ in range(rounds):
        for bs in batch_sizes:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for i in range(0, len(x), bs):
                    fn(x[i : i + bs])
                times[name][bs].append(time.perf_counter() - t0)
    base = {bs: statistics.median(times["torch_eager"][bs]) for bs in batch_sizes}
    return {
        "trainable_stages": stages,
        "output_shape": list(reference.shape[1:]),
        "setup_s": {k: round(v, 2) if isinstance(v, float) else v for k, v in setup.items()},
        "max_abs_diff_vs_eager": diffs,
        "ms_per_image": {
            name: {bs: round(1000 * statistics.median(t) / len(x), 2) for bs, t in per.items()}
            for name, per in times.items()
        },
        "speedup_vs_eager": {
            name: {bs: round(base[bs] / statistics.median(t), 2) for bs, t in per.items()}
            for name, per in times.items()
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of every runtime (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pixels = films(args.images, args.image_size)
    report = {
        "images": args.images,
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        report["results"] = [measure(s, pixels, args.batch_sizes, args.rounds, Path(tmp)) for s in args.stages]
    report["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
