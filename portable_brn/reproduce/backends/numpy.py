"""The NumPy backend: the array layer in a small hand-built network, no autodiff.

The dense layers, ReLU and softmax cross-entropy are written out with their gradients;
the normalization layers are ``portable_brn.adapters.array.BatchRenorm``, whose
``backward`` is the core's (specification section 4).  SGD with momentum updates the parameters
in place.  Everything is float32, as in the other backends.
"""

from __future__ import annotations

import numpy as np

from portable_brn.adapters.array import BatchRenorm

from . import NetworkSpec

__all__ = ["NumpyNetwork", "build"]


def _softmax_cross_entropy_grad(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean softmax cross-entropy with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    probabilities[np.arange(len(y)), y] -= 1.0
    return probabilities / len(y)


class NumpyNetwork:
    """Linear -> BatchRenorm -> ReLU per hidden layer, then Linear, trained by SGD."""

    def __init__(self, spec: NetworkSpec):
        self.weights = [np.array(w, dtype=np.float32) for w in spec.weights]
        self.output_bias = np.array(spec.output_bias, dtype=np.float32)
        self.norms = [BatchRenorm(w.shape[1], feature_axis=1, xp=np, dtype=np.float32,
                                  **spec.norm) for w in self.weights[:-1]]
        self.learning_rate = spec.learning_rate
        self.sgd_momentum = spec.sgd_momentum
        self.velocities = [np.zeros_like(p) for p in self._parameters()]

    def _parameters(self) -> list[np.ndarray]:
        """Every trainable array, in the order ``_gradients`` returns their gradients."""
        scales = [norm.weight for norm in self.norms]
        shifts = [norm.bias for norm in self.norms]
        return [*self.weights, self.output_bias, *scales, *shifts]

    def _forward(self, x: np.ndarray, training: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits and the input of every dense layer (what backward needs)."""
        inputs = [x]
        for weight, norm in zip(self.weights[:-1], self.norms, strict=True):
            inputs.append(np.maximum(norm.forward(inputs[-1] @ weight, training), 0.0))
        return inputs[-1] @ self.weights[-1] + self.output_bias, inputs

    def _gradients(self, x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
        """Backpropagation of the mean cross-entropy through the whole network."""
        logits, inputs = self._forward(x, training=True)
        grad = _softmax_cross_entropy_grad(logits, y)
        weight_grads = [inputs[-1].T @ grad]
        bias_grad = grad.sum(axis=0)
        for layer in reversed(range(len(self.norms))):
            grad = (grad @ self.weights[layer + 1].T) * (inputs[layer + 1] > 0)
            grad = self.norms[layer].backward(grad)
            weight_grads.append(inputs[layer].T @ grad)
        return [*weight_grads[::-1], bias_grad,
                *(norm.grad_weight for norm in self.norms),
                *(norm.grad_bias for norm in self.norms)]

    def sgd_step(self, x: np.ndarray, y: np.ndarray) -> None:
        """One step of SGD with momentum: ``v = m v + g``, ``p -= lr v``."""
        grads = self._gradients(x, y)
        for parameter, velocity, grad in zip(self._parameters(), self.velocities, grads,
                                             strict=True):
            velocity *= self.sgd_momentum
            velocity += grad
            parameter -= self.learning_rate * velocity

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Labels from the inference-mode network (moving statistics)."""
        logits, _ = self._forward(x, training=False)
        return logits.argmax(axis=1)


def build(spec: NetworkSpec) -> NumpyNetwork:
    """A fresh NumPy network from ``spec``."""
    return NumpyNetwork(spec)
