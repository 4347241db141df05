"""The PyTorch backend: ``portable_brn.adapters.torch.BatchRenorm1d`` in an
``nn.Sequential``, gradients from autograd, updates from ``torch.optim.SGD``.

torch's ``momentum`` is, like the paper's alpha, the weight of the new batch statistic,
so the normalization options pass through unchanged.  torch is imported when a network
is built, never when this module is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import NetworkSpec

__all__ = ["TorchNetwork", "build"]


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

    def train_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One SGD step on the mean cross-entropy, normalization in training mode."""
        torch = self._torch
        self.model.train()
        self.optimizer.zero_grad()
        logits = self.model(torch.from_numpy(x))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
        self.optimizer.step()

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels from the network in ``eval()`` mode (moving statistics)."""
        self.model.eval()
        with self._torch.no_grad():
            return self.model(self._torch.from_numpy(x)).argmax(dim=1).numpy()


def build(spec: NetworkSpec) -> TorchNetwork:
    """A fresh PyTorch network from ``spec``."""
    return TorchNetwork(spec)
