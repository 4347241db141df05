"""Backends that run the cases through the framework adapters instead of the bare core.

Each adapter backend opens a *session* per case: a layer (or functional state) of the
adapter, loaded with the case's initial state and parameters, offering
``train(x, dy)`` and ``infer(x)`` that return host outputs named as in ``expected``.
Adapters offer training and inference only, so cases with a deferred recurrent update
or a recalibration do not apply to them.  A backend whose framework is not installed
skips, naming it; an ``ImportError`` raised inside the project's own adapter is a bug
and propagates.  Keyword arguments come from ``portable_brn.conventions``, as the
adapters' own translations do.
"""

from __future__ import annotations

import contextlib
import importlib
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from portable_brn.conventions import flax_options, torch_options

from .arrays import dtype_pair, to_numpy
from .backends import QUICK_CASES, Backend, CoreBackend, Unavailable, quiet_nonfinite
from .cases import Case, Outputs
from .runner import core_config

__all__ = ["AdapterBackend", "ArrayLayerBackend", "FlaxBackend", "JaxFunctionalBackend",
           "NnxBackend",
           "TorchModulesBackend"]


class Session(ABC):
    """One case's layer: ``train`` and ``infer`` return host outputs."""

    @abstractmethod
    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        """A training step (statistics over ``mask``'s elements when given) and its
        backward pass: y, dx, dweight, dbias and state."""

    @abstractmethod
    def infer(self, x: np.ndarray) -> Outputs:
        """An inference call: y."""


def _options(case: Case) -> dict[str, Any]:
    """The case's configuration as the keywords of a torch module or the array layer
    (the core's names), ``feature_axis`` aside."""
    return torch_options(core_config(case.config))


def _flax_options(case: Case, param_dtype: Any) -> dict[str, Any]:
    """The case as keyword arguments of a Flax ``BatchRenorm`` (linen or nnx)."""
    return {"param_dtype": param_dtype, "use_scale": case.weight is not None,
            "use_bias": case.bias is not None, **flax_options(core_config(case.config))}


class AdapterBackend(Backend):
    """Runs a case's train and infer ops through a ``Session`` of ``module_name``."""

    module_name: str

    def load(self) -> None:
        try:
            self.module = importlib.import_module(self.module_name)
        except ModuleNotFoundError as error:
            missing = (error.name or "").partition(".")[0]
            if not missing or missing == "portable_brn":
                raise  # the project's own module is missing: a bug, not a skip
            raise Unavailable(f"{missing} is not installed ({self.module_name} needs it)",
                              missing=missing) from error

    def supports(self, case: Case) -> str | None:
        kinds = sorted({op.kind for op in case.ops} - {"train", "infer"})
        return f"the adapter offers no {' or '.join(kinds)}" if kinds else None

    @abstractmethod
    def session(self, case: Case, dtype: str) -> Session:
        """A fresh layer holding ``case``'s initial state and parameters."""

    def run(self, case: Case, dtype: str) -> tuple[Outputs, ...]:
        with self.context(), quiet_nonfinite(case):
            layer = self.session(case, dtype)
            return tuple(layer.train(op.xs[0], op.dys[0], op.masks[0] if op.masks else None)
                         if op.kind == "train" else layer.infer(op.xs[0]) for op in case.ops)


def _host(arrays: dict[str, Any]) -> Outputs:
    return {name: to_numpy(a) for name, a in arrays.items() if a is not None}


# ---------------------------------------------------------------------------
# portable_brn.adapters.array: the stateful layer for plain arrays
# ---------------------------------------------------------------------------


class _ArrayLayerSession(Session):
    def __init__(self, module: Any, base: CoreBackend, case: Case, dtype: str):
        self.base = base
        self.x_dtype, p_dtype = dtype_pair(base.xp, dtype)
        shape = case.mean.shape
        self.layer = module.BatchRenorm(
            shape[0] if len(shape) == 1 else shape, feature_axis=case.config["feature_axis"],
            affine=case.weight is not None, xp=base.xp, dtype=p_dtype, device=base.device,
            **_options(case))
        arrays = {"running_mean": case.mean, "running_std": case.std,
                  "num_batches_tracked": np.asarray(case.step)}
        if case.weight is not None:
            arrays.update(weight=case.weight, bias=case.bias)
        self.layer.load_state_dict(arrays)

    def _state(self) -> dict[str, Any]:
        """The state after a training step, with the step's per-feature finite flags
        (the layer's ``last_finite``)."""
        state = self.layer.state
        return {"mean": state.mean, "std": state.std, "step": state.step,
                "finite": self.layer.last_finite}

    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        mask = None if mask is None else self.base.asarray(mask, self.base.xp.bool)
        y = self.layer.forward(self.base.asarray(x, self.x_dtype), training=True, mask=mask)
        dx = self.layer.backward(self.base.asarray(dy, self.x_dtype))
        return _host({"y": y, "dx": dx, "dweight": self.layer.grad_weight,
                      "dbias": self.layer.grad_bias, **self._state()})

    def infer(self, x: np.ndarray) -> Outputs:
        return _host({"y": self.layer.forward(self.base.asarray(x, self.x_dtype),
                                              training=False)})


class ArrayLayerBackend(AdapterBackend):
    """``portable_brn.adapters.array.BatchRenorm`` on the namespace of a core backend."""

    module_name = "portable_brn.adapters.array"

    def __init__(self, base: CoreBackend):
        self.base = base
        self.name, self.dtypes = f"layer-{base.name}", base.dtypes
        self.about = f"the array layer (adapters.array) on {base.about}"

    def load(self) -> None:
        base = self.base.unavailable
        if base is not None:
            raise Unavailable(str(base), missing=base.missing)
        super().load()

    def session(self, case: Case, dtype: str) -> Session:
        return _ArrayLayerSession(self.module, self.base, case, dtype)


# ---------------------------------------------------------------------------
# portable_brn.adapters.jax and .flax: jit-compiled, gradients by jax.vjp
# ---------------------------------------------------------------------------


class _JaxSession(Session):
    """Shared by the JAX adapters: arrays in and out, ``jax.jit`` on both calls."""

    def __init__(self, dtype: str):
        import jax
        import jax.numpy as jnp
        self.jax, self.jnp = jax, jnp
        self.x_dtype, self.p_dtype = dtype_pair(jnp, dtype)

    def put(self, array: np.ndarray | None, dtype: Any) -> Any:
        return None if array is None else self.jnp.asarray(array, dtype=dtype)


class _JaxFunctionalSession(_JaxSession):
    def __init__(self, module: Any, case: Case, dtype: str, use_custom_vjp: bool):
        super().__init__(dtype)
        from portable_brn import RenormState
        config = core_config(case.config)
        self.state = RenormState(self.put(case.mean, self.p_dtype),
                                 self.put(case.std, self.p_dtype),
                                 self.jnp.asarray(case.step))
        self.weight, self.bias = (self.put(case.weight, self.p_dtype),
                                  self.put(case.bias, self.p_dtype))

        def train(x: Any, state: Any, weight: Any, bias: Any, dy: Any, mask: Any) -> tuple:
            def forward(x: Any, weight: Any, bias: Any) -> tuple:
                out = module.renorm_train(x, state, weight, bias, config, mask=mask,
                                          use_custom_vjp=use_custom_vjp)
                return out.y, (out.state, out.finite)
            y, pullback, (new_state, finite) = self.jax.vjp(forward, x, weight, bias,
                                                            has_aux=True)
            return (y, *pullback(dy)), new_state, finite

        self.train_fn = self.jax.jit(train)
        self.infer_fn = self.jax.jit(
            lambda x, state, w, b: module.renorm_infer(x, state, w, b, config))

    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        (y, dx, dweight, dbias), self.state, finite = self.train_fn(
            self.put(x, self.x_dtype), self.state, self.weight, self.bias,
            self.put(dy, self.x_dtype), self.put(mask, bool))
        return _host({"y": y, "dx": dx, "dweight": dweight, "dbias": dbias,
                      "mean": self.state.mean, "std": self.state.std,
                      "step": self.state.step, "finite": finite})

    def infer(self, x: np.ndarray) -> Outputs:
        return _host({"y": self.infer_fn(self.put(x, self.x_dtype), self.state, self.weight,
                                         self.bias)})


class _JaxAdapterBackend(AdapterBackend):
    """Common ground of the JAX adapters: x64 for the run, the quick case subset below
    float64."""

    dtypes = ("float64", "float32", "bfloat16")
    quick_cases = QUICK_CASES

    def load(self) -> None:
        super().load()
        import jax
        self.jax = jax

    def context(self) -> contextlib.AbstractContextManager:
        return self.jax.enable_x64(True)


class JaxFunctionalBackend(_JaxAdapterBackend):
    """``portable_brn.adapters.jax.renorm_train``/``renorm_infer`` under ``jax.jit``,
    differentiated with the core's backward (custom VJP) or by JAX autodiff."""

    module_name = "portable_brn.adapters.jax"

    def __init__(self, use_custom_vjp: bool):
        self.use_custom_vjp = use_custom_vjp
        self.name = "jax-adapter" + ("" if use_custom_vjp else "-autodiff")
        self.about = ("adapters.jax, jit, " + ("custom VJP (the core's backward)"
                                               if use_custom_vjp else "JAX autodiff"))

    def session(self, case: Case, dtype: str) -> Session:
        return _JaxFunctionalSession(self.module, case, dtype, self.use_custom_vjp)


class _FlaxSession(_JaxSession):
    def __init__(self, module: Any, case: Case, dtype: str):
        super().__init__(dtype)
        layer = module.BatchRenorm(**_flax_options(case, self.p_dtype))
        self.params = {name: self.put(value, self.p_dtype) for name, value in
                       (("scale", case.weight), ("bias", case.bias)) if value is not None}
        self.stats = {"mean": self.put(case.mean, self.p_dtype),
                      "std": self.put(case.std, self.p_dtype),
                      "step": self.jnp.asarray(case.step)}

        def train(params: dict, stats: dict, x: Any, dy: Any, mask: Any) -> tuple:
            def forward(x: Any, params: dict) -> tuple:
                return layer.apply({"params": params, "batch_stats": stats}, x,
                                   use_running_average=False, mask=mask,
                                   mutable=["batch_stats", "intermediates"])
            y, pullback, updates = self.jax.vjp(forward, x, params, has_aux=True)
            dx, dparams = pullback(dy.astype(y.dtype))  # Flax promotes y to the params dtype
            return y, dx, dparams, updates["batch_stats"], updates["intermediates"]["finite"]

        self.train_fn = self.jax.jit(train)
        self.infer_fn = self.jax.jit(lambda params, stats, x: layer.apply(
            {"params": params, "batch_stats": stats}, x, use_running_average=True))

    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        y, dx, dparams, self.stats, finite = self.train_fn(
            self.params, self.stats, self.put(x, self.x_dtype), self.put(dy, self.x_dtype),
            self.put(mask, bool))
        return _host({"y": y, "dx": dx, "dweight": dparams.get("scale"),
                      "dbias": dparams.get("bias"), **self.stats, "finite": finite})

    def infer(self, x: np.ndarray) -> Outputs:
        return _host({"y": self.infer_fn(self.params, self.stats, self.put(x, self.x_dtype))})


class FlaxBackend(_JaxAdapterBackend):
    """``portable_brn.adapters.flax.BatchRenorm`` (linen) under ``jax.jit``: momentum
    given as Flax's decay ``1 - alpha``, state in ``batch_stats``, gradients by
    ``jax.vjp`` of ``apply``."""

    module_name = "portable_brn.adapters.flax"
    name = "flax-linen"
    about = "adapters.flax BatchRenorm (linen), jit"

    def session(self, case: Case, dtype: str) -> Session:
        return _FlaxSession(self.module, case, dtype)


class _NnxSession(_JaxSession):
    def __init__(self, module: Any, case: Case, dtype: str):
        super().__init__(dtype)
        from flax import nnx
        layer = module.BatchRenorm(int(np.size(case.mean)), rngs=nnx.Rngs(0),
                                   **_flax_options(case, self.p_dtype))
        for name, value, dtype in (("mean", case.mean, self.p_dtype),
                                   ("std", case.std, self.p_dtype), ("scale", case.weight,
                                                                     self.p_dtype),
                                   ("bias", case.bias, self.p_dtype)):
            if value is not None:
                getattr(layer, name)[...] = self.put(value, dtype)
        layer.step[...] = self.jnp.asarray(case.step)
        graphdef, self.params, self.stats = nnx.split(layer, nnx.Param, nnx.BatchStat)

        def train(params: Any, stats: Any, x: Any, dy: Any, mask: Any) -> tuple:
            def forward(x: Any, params: Any, stats: Any) -> tuple:
                # stats is a primal (its cotangent unused): nnx mutates it on this trace
                model = nnx.merge(graphdef, params, stats)
                y, sown = nnx.capture(model, nnx.Intermediate)(x, use_running_average=False,
                                                               mask=mask)
                return y, (nnx.state(model, nnx.BatchStat), sown["finite"][...])
            y, pullback, (new_stats, finite) = self.jax.vjp(forward, x, params, stats,
                                                            has_aux=True)
            dx, dparams, _ = pullback(dy.astype(y.dtype))
            return y, dx, dparams, new_stats, finite

        def infer(params: Any, stats: Any, x: Any) -> Any:
            return nnx.merge(graphdef, params, stats)(x, use_running_average=True)

        self.pure = nnx.to_pure_dict
        self.train_fn, self.infer_fn = self.jax.jit(train), self.jax.jit(infer)

    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        y, dx, dparams, self.stats, finite = self.train_fn(
            self.params, self.stats, self.put(x, self.x_dtype), self.put(dy, self.x_dtype),
            self.put(mask, bool))
        grads = self.pure(dparams)
        return _host({"y": y, "dx": dx, "dweight": grads.get("scale"),
                      "dbias": grads.get("bias"), **self.pure(self.stats), "finite": finite})

    def infer(self, x: np.ndarray) -> Outputs:
        return _host({"y": self.infer_fn(self.params, self.stats, self.put(x, self.x_dtype))})


class NnxBackend(_JaxAdapterBackend):
    """``portable_brn.adapters.nnx.BatchRenorm`` under ``jax.jit`` through
    ``nnx.split``/``nnx.merge``; one feature axis (nnx's ``num_features`` is an int)."""

    module_name = "portable_brn.adapters.nnx"
    name = "flax-nnx"
    about = "adapters.nnx BatchRenorm (flax.nnx), jit"

    def supports(self, case: Case) -> str | None:
        if isinstance(case.config["feature_axis"], tuple):
            return "the nnx module takes one feature axis"
        return super().supports(case)

    def session(self, case: Case, dtype: str) -> Session:
        return _NnxSession(self.module, case, dtype)


# ---------------------------------------------------------------------------
# portable_brn.adapters.torch: BatchRenorm1d/2d/3d modules, autograd
# ---------------------------------------------------------------------------


class _TorchModuleSession(Session):
    def __init__(self, module: Any, case: Case, dtype: str):
        import torch
        self.torch = torch
        self.x_dtype = getattr(torch, dtype)
        p_dtype = self.x_dtype if dtype in ("float64", "float32") else torch.float32
        ndim = case.ops[0].xs[0].ndim
        cls = getattr(module, {2: "BatchRenorm1d", 3: "BatchRenorm1d", 4: "BatchRenorm2d",
                               5: "BatchRenorm3d"}[ndim])
        self.layer = cls(case.mean.shape[0], affine=case.weight is not None, dtype=p_dtype,
                         **_options(case))
        with torch.no_grad():
            self.layer.running_mean.copy_(torch.from_numpy(case.mean))
            self.layer.running_std.copy_(torch.from_numpy(case.std))
            self.layer.num_batches_tracked.fill_(case.step)
            if case.weight is not None:
                self.layer.weight.copy_(torch.from_numpy(case.weight))
                self.layer.bias.copy_(torch.from_numpy(case.bias))

    def _put(self, array: np.ndarray, grad: bool = False) -> Any:
        return self.torch.tensor(array, dtype=self.x_dtype, requires_grad=grad)

    def train(self, x: np.ndarray, dy: np.ndarray, mask: np.ndarray | None) -> Outputs:
        layer = self.layer.train()
        for param in layer.parameters():
            param.grad = None
        x = self._put(x, grad=True)
        y = layer(x) if mask is None else layer(x, mask=self.torch.from_numpy(mask))
        y.backward(self._put(dy))
        weight, bias = (getattr(layer, "weight", None), getattr(layer, "bias", None))
        return _host({"y": y, "dx": x.grad,
                      "dweight": None if weight is None else weight.grad,
                      "dbias": None if bias is None else bias.grad,
                      "mean": layer.running_mean, "std": layer.running_std,
                      "step": layer.num_batches_tracked, "finite": layer.last_finite})

    def infer(self, x: np.ndarray) -> Outputs:
        with self.torch.no_grad():
            return _host({"y": self.layer.eval()(self._put(x))})


class TorchModulesBackend(AdapterBackend):
    """``portable_brn.adapters.torch.BatchRenorm1d/2d/3d`` with autograd.

    Expects torch's conventions: ``(num_features, eps=, momentum=, affine=, dtype=,
    r_max=, d_max=, r_min=, warmup_steps=, micro_batch=, output_clip=)`` with
    ``momentum`` the weight of the new value, buffers ``running_mean``, ``running_std``
    and ``num_batches_tracked``; features on axis 1 only.
    """

    module_name = "portable_brn.adapters.torch"
    name = "torch-modules"
    about = "adapters.torch BatchRenorm1d/2d/3d, autograd"
    dtypes = ("float64", "float32", "bfloat16")

    def supports(self, case: Case) -> str | None:
        axis = case.config["feature_axis"]
        ndim = case.ops[0].xs[0].ndim
        if isinstance(axis, tuple) or axis % ndim != 1 or not 2 <= ndim <= 5:
            return "torch modules take features on axis 1 of a rank 2 to 5 input"
        return super().supports(case)

    def session(self, case: Case, dtype: str) -> Session:
        return _TorchModuleSession(self.module, case, dtype)
