"""The PyTorch backend: ``portable_brn.adapters.torch.BatchRenorm1d`` in an
``nn.Sequential``, gradients from autograd, updates from ``torch.optim.SGD``.

torch's ``momentum`` is, like the paper's alpha, the weight of the new batch statistic,
so the normalization options pass through unchanged.  torch is imported when a network
is built, never when this module is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from portable_brn.host import to_host

from . import NetworkSpec

__all__ = ["TorchNetwork", "build"]


@contextmanager
def _one_thread(torch: Any) -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's setting.

    A network this small gains nothing from threads, and on a busy machine their
    barriers each wait for a scheduler time slice: measured on 2 shared cores, training
    steps of 0.25 s instead of 0.6 ms.  Restoring keeps the caller's process as it was.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TorchNetwork:
    """Linear -> BatchRenorm1d -> ReLU per hidden layer, then Linear, on the CPU."""

    def __init__(self, spec: NetworkSpec):
        import torch

        from portable_brn.adapters.torch import BatchRenorm1d

        self._torch = torch
        layers: list[Any] = []
        for weight in spec.weights[:-1]:
            layers += [torch.nn.Linear(*weight.shape, bias=False),
                       BatchRenorm1d(weight.shape[1], **spec.norm), torch.nn.ReLU()]
        output = torch.nn.Linear(*spec.weights[-1].shape)
        self.model = torch.nn.Sequential(*layers, output)
        linears = [layer for layer in self.model if isinstance(layer, torch.nn.Linear)]
        with torch.no_grad():
            for linear, weight in zip(linears, spec.weights, strict=True):
                linear.weight.copy_(torch.from_numpy(weight.T))
            output.bias.copy_(torch.from_numpy(spec.output_bias))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=spec.learning_rate,
                                         momentum=spec.sgd_momentum)

    def sgd_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One SGD step on the mean cross-entropy, normalization in training mode."""
        torch = self._torch
        with _one_thread(torch):
            self.model.train()
            self.optimizer.zero_grad()
            logits = self.model(torch.from_numpy(x))
            torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
            self.optimizer.step()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels from the network in ``eval()`` mode (moving statistics)."""
        torch = self._torch
        self.model.eval()
        with _one_thread(torch), torch.no_grad():
            return to_host(self.model(torch.from_numpy(x)).argmax(dim=1))


def build(spec: NetworkSpec) -> TorchNetwork:
    """A fresh PyTorch network from ``spec``."""
    return TorchNetwork(spec)
