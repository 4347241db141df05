"""Options set on a Flax layer after construction take effect or fail clearly (issue 13,
item 5): ``NnxBatchRenorm`` folds them into its ``config``, checked, used from the next
call; a linen module builds its configuration from its fields at every call."""

from __future__ import annotations

import numpy as np
import pytest

from portable_brn.conformance import reference as ref

from conftest import rel_err

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from portable_brn.adapters.flax import BatchRenorm, NnxBatchRenorm  # noqa: E402

X = np.random.default_rng(0).normal(2.0, 0.3, (8, 3)).astype(np.float32)  # the clips bind


def _model() -> NnxBatchRenorm:
    return NnxBatchRenorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(("name", "value", "reference"), [
    ("r_max", 1.2, {"r_max": 1.2}), ("d_max", 0.3, {"d_max": 0.3}),
    ("momentum", 0.5, {"momentum": 0.5}), ("epsilon", 0.1, {"eps": 0.1}),
    ("warmup_steps", 1, {"warmup_steps": 1}), ("r_min", 0.9, {"r_min": 0.9}),
    ("output_clip", (-1.0, 1.0), {"output_clip": (-1.0, 1.0)}),
])
def test_nnx_option_set_after_construction_is_used(name, value, reference) -> None:
    model = _model()
    setattr(model, name, value)
    assert getattr(model, name) == value
    y = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(X))
    expected = ref.train_step(X, np.zeros(3), np.ones(3), 0, feature_axis=-1,
                              **{"momentum": 0.01, **reference})
    default = ref.train_step(X, np.zeros(3), np.ones(3), 0, feature_axis=-1, momentum=0.01)
    assert rel_err(np.asarray(y), expected["y"]) < 1e-5
    assert rel_err(np.asarray(model.std[...]), expected["std"]) < 1e-5
    assert max(rel_err(np.asarray(y), default["y"]),
               rel_err(np.asarray(model.std[...]), default["std"])) > 1e-4, "no effect"


@pytest.mark.parametrize(("name", "value", "error", "message"), [
    ("r_max", 0.5, ValueError, r"^r_max must be in \[1\.0, inf\]"),
    ("momentum", 1.0, ValueError, r"^momentum is the decay of the old statistics"),
    ("epsilon", "small", TypeError, r"^epsilon must be a real number"),
    ("axis", (1, 1), ValueError, r"^axis has a repeated axis"),
])
def test_nnx_bad_option_is_refused_and_changes_nothing(name, value, error, message) -> None:
    model = _model()
    before = model.config
    with pytest.raises(error, match=message):
        setattr(model, name, value)
    assert model.config is before


@pytest.mark.parametrize("name", ["num_features", "param_dtype", "use_bias", "use_scale",
                                  "bias_init", "scale_init"])
def test_nnx_options_that_shaped_the_variables_are_read_only(name) -> None:
    model = _model()
    constructed = {"num_features": 3, "param_dtype": jnp.float32, "use_bias": False,
                   "use_scale": False, "bias_init": nnx.initializers.zeros,
                   "scale_init": nnx.initializers.ones}[name]
    assert getattr(model, name) == constructed  # readable, as on flax.nnx.BatchNorm
    with pytest.raises(AttributeError, match=rf"^NnxBatchRenorm\.{name} cannot be changed"):
        setattr(model, name, 4)
    assert getattr(model, name) == constructed


def test_nnx_call_options_stay_plain_attributes() -> None:
    model = _model()
    model.use_running_average = True
    model.use_custom_vjp = False
    y = model(jnp.asarray(X))
    assert rel_err(np.asarray(y), ref.infer(X, np.zeros(3), np.ones(3))) < 1e-6
    assert int(model.step[...]) == 0


def test_linen_option_set_on_an_unbound_module_is_used_and_checked() -> None:
    """A linen module is a dataclass: an option set before ``apply`` is the one the call
    uses (its configuration is built from the fields at each call), checked there."""
    module = BatchRenorm(use_running_average=False, use_scale=False, use_bias=False)
    variables = module.init(jax.random.key(0), jnp.asarray(X))
    module.r_max = 1.2
    y, _ = module.apply(variables, jnp.asarray(X), mutable=["batch_stats"])
    expected = ref.train_step(X, np.zeros(3), np.ones(3), 0, momentum=0.01, r_max=1.2)
    assert rel_err(np.asarray(y), expected["y"]) < 1e-5
    module.r_max = 0.5
    with pytest.raises(ValueError, match=r"^r_max must be in \[1\.0, inf\]"):
        module.apply(variables, jnp.asarray(X), mutable=["batch_stats"])


@pytest.mark.parametrize(("options", "message"), [
    ({"epsilon": -1.0}, r"^epsilon must be in"), ({"axis": ()}, r"^axis must name"),
])
def test_flax_constructors_name_flax_arguments(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        BatchRenorm(**options)
    with pytest.raises(ValueError, match=message):
        NnxBatchRenorm(3, rngs=nnx.Rngs(0), **options)
