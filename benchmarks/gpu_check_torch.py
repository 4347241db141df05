"""The PyTorch layers on a CUDA device against the float64 reference (specification section 6).

Every configuration the native path serves (float32, bfloat16 and float16 inputs;
NCHW, channels-last and ``(N, C)``; ``micro_batch``; ``output_clip``; no running
statistics) trains for a few steps on the device; y, dx, dweight, dbias and the new
state are compared with ``portable_brn.conformance.reference`` on the same inputs.
Prints one line per configuration and exits non-zero on any miss.

    python benchmarks/gpu_check_torch.py [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from portable_brn.adapters.torch import BatchRenorm1d, BatchRenorm2d
from portable_brn.conformance import reference
from portable_brn.conformance.checks import relative_error

BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
CONFIGS = [
    ("2d", BatchRenorm2d, (8, 4, 5, 5), {}, False),
    ("2d channels_last", BatchRenorm2d, (8, 4, 5, 5), {}, True),
    ("1d rows", BatchRenorm1d, (64, 16), {}, False),
    ("micro_batch=2", BatchRenorm2d, (8, 4, 5, 5), {"micro_batch": 2}, False),
    ("micro_batch=4 channels_last", BatchRenorm2d, (8, 4, 5, 5), {"micro_batch": 4}, True),
    ("output_clip", BatchRenorm2d, (8, 4, 5, 5), {"output_clip": (-1.0, 1.5)}, False),
    ("no running stats", BatchRenorm2d, (8, 4, 5, 5),
     {"track_running_stats": False, "micro_batch": 4}, False),
]


def _numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().double().cpu().numpy()


def check(name, layer_class, shape, options, channels_last, dtype, device, steps=3):
    """Worst relative error of any result over ``steps`` steps."""
    generator = torch.Generator().manual_seed(0)
    layer = layer_class(shape[1], r_max=1.3, d_max=0.4, momentum=0.3, **options).to(device)
    with torch.no_grad():
        layer.weight.copy_(0.5 + torch.rand(shape[1], generator=generator))
        layer.bias.copy_(torch.randn(shape[1], generator=generator))
    stateful = layer.running_mean is not None
    mean, std = np.zeros(shape[1]), np.ones(shape[1])
    worst = 0.0
    for step in range(steps):
        x = (torch.randn(shape, generator=generator) * 2 + 1).to(device, dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        grad = torch.randn(shape, generator=generator).to(device, dtype)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(grad)
        renorm = {k: v for k, v in options.items() if k in ("micro_batch", "output_clip")}
        limits = {"r_max": 1.3, "d_max": 0.4} if stateful else {"r_max": 1.0, "d_max": 0.0}
        expected = reference.train_step(
            _numpy(x), mean, std, step if stateful else 0, _numpy(layer.weight),
            _numpy(layer.bias), _numpy(grad), eps=layer.eps, momentum=0.3, **limits, **renorm)
        pairs = {"y": y, "dx": x.grad, "dweight": layer.weight.grad, "dbias": layer.bias.grad}
        if stateful:
            pairs.update(mean=layer.running_mean, std=layer.running_std)
            mean, std = expected["mean"], expected["std"]
        for key, actual in pairs.items():
            error = relative_error(_numpy(actual), expected[key])
            worst = error if not error <= worst else worst  # NaN sticks
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    rows, failed = [], False
    for name, layer_class, shape, options, channels_last in CONFIGS:
        for dtype in BOUND:
            error = check(name, layer_class, shape, options, channels_last, dtype, args.device)
            ok = error <= BOUND[dtype]
            failed |= not ok
            rows.append({"config": name, "dtype": str(dtype), "error": error, "ok": ok})
            print(f"{'ok  ' if ok else 'FAIL'} {name:<28} {dtype!s:<15} {error:.2e}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": args.device, "rows": rows}, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
