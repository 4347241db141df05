"""A CrossQ-style critic ensemble with batch renormalization, in JAX and Flax linen.

CrossQ (Bhatt et al., ICLR 2024) drops the target network of SAC-like agents and instead
puts batch (re)normalization in the critic, with one rule: the (s, a) batch and the
(s', a') batch go through the critic *together*, as one concatenated batch, so both are
normalized with the same statistics (two separate forwards would normalize the
bootstrapped next-state values with statistics of a different distribution).

Here an ensemble of critics is one ``flax.linen.vmap`` over a critic MLP, with
``params`` and ``batch_stats`` split across members (each member has its own moving
statistics and step counter).  Each training step is one joint forward in training mode,
so every renorm layer's step advances once per step; the targets come from the second half
of the same forward, behind ``stop_gradient``.  Evaluation (e.g. the actor's loss in a full
agent) uses the moving statistics: ``train=False``.

Run ``python examples/crossq_critic_jax.py --steps 300``: a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from portable_brn.adapters.flax import BatchRenorm

OBS_DIM, ACT_DIM = 6, 2
GAMMA = 0.5  # a short horizon: the demo's TD targets settle within a few hundred steps


class Critic(nn.Module):
    """Q(s, a): renorm on the input and after each hidden layer, as in CrossQ."""

    hidden: int = 64
    warmup_steps: int = 20

    @nn.compact
    def __call__(self, obs_act: jax.Array, train: bool) -> jax.Array:
        def renorm(x: jax.Array) -> jax.Array:
            # Flax convention: momentum is the decay (0.99 is the paper's alpha = 0.01);
            # r = 1, d = 0 (plain batch norm) until the moving statistics have warmed up
            return BatchRenorm(use_running_average=not train, momentum=0.99,
                               warmup_steps=self.warmup_steps, r_max=3.0, d_max=5.0)(x)

        x = renorm(obs_act)
        for _ in range(2):
            x = renorm(nn.relu(nn.Dense(self.hidden)(x)))
        return nn.Dense(1)(x)[..., 0]


def make_ensemble(n_critics: int = 2, hidden: int = 64, warmup_steps: int = 20) -> nn.Module:
    """``n_critics`` independent critics as one module: outputs ``(n_critics, batch)``."""
    ensemble = nn.vmap(Critic, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, in_axes=None, out_axes=0,
                       axis_size=n_critics)
    return ensemble(hidden=hidden, warmup_steps=warmup_steps)


def synthetic_transitions(key: jax.Array, n: int) -> dict[str, jax.Array]:
    """Random (s, a, r, s', done) with a smooth reward of (s, a)."""
    k_obs, k_act, k_next = jax.random.split(key, 3)
    obs = jax.random.normal(k_obs, (n, OBS_DIM))
    act = jnp.tanh(jax.random.normal(k_act, (n, ACT_DIM)))
    reward = jnp.sin(obs[:, 0]) + 0.5 * obs[:, 1] * act[:, 0] - 0.1 * jnp.sum(act**2, -1)
    next_obs = 0.9 * obs + 0.3 * jax.random.normal(k_next, (n, OBS_DIM))
    done = (jnp.arange(n) % 50 == 49).astype(jnp.float32)
    return {"obs": obs, "act": act, "reward": reward, "next_obs": next_obs, "done": done}


def policy(obs: jax.Array) -> jax.Array:
    """A fixed deterministic policy for the next actions a' (a full agent learns it)."""
    return jnp.tanh(obs[:, :ACT_DIM] - 0.5 * obs[:, ACT_DIM:2 * ACT_DIM])


def joint_batch(batch: dict[str, jax.Array]) -> jax.Array:
    """``[(s, a); (s', a')]``: one batch of 2B rows, so both halves share statistics."""
    current = jnp.concatenate([batch["obs"], batch["act"]], axis=-1)
    following = jnp.concatenate([batch["next_obs"], policy(batch["next_obs"])], axis=-1)
    return jnp.concatenate([current, following], axis=0)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    batch_size: int) -> Any:
    """One critic update on a batch drawn from the buffer: one joint forward in training
    mode (one renorm step), a TD loss against the ensemble's min over members of
    Q(s', a'), no target network."""

    def loss_fn(params: Any, stats: Any, batch: dict[str, jax.Array]) -> tuple:
        q_all, updates = model.apply({"params": params, "batch_stats": stats},
                                     joint_batch(batch), True, mutable=["batch_stats"])
        half = batch["reward"].shape[0]
        q, q_next = q_all[:, :half], q_all[:, half:]
        target = batch["reward"] + GAMMA * (1.0 - batch["done"]) * jnp.min(q_next, axis=0)
        loss = jnp.mean((q - jax.lax.stop_gradient(target)) ** 2)
        return loss, updates["batch_stats"]

    @jax.jit
    def train_step(params: Any, stats: Any, opt_state: Any, buffer: dict, key: jax.Array,
                   ) -> tuple:
        index = jax.random.randint(key, (batch_size,), 0, buffer["reward"].shape[0])
        batch = jax.tree.map(lambda a: a[index], buffer)
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss, batch

    return train_step


def train(steps: int = 300, batch_size: int = 64, n_critics: int = 2, hidden: int = 64,
          seed: int = 0) -> dict[str, Any]:
    """Train the ensemble on a fixed buffer of synthetic transitions; returns the model,
    its variables, the per-step losses, the last batch and the buffer."""
    model = make_ensemble(n_critics, hidden)
    key_data, key_init, key_batches = jax.random.split(jax.random.key(seed), 3)
    buffer = synthetic_transitions(key_data, 2048)
    first = joint_batch(jax.tree.map(lambda a: a[:batch_size], buffer))
    variables = jax.jit(model.init, static_argnums=2)(key_init, first, True)  # jit: faster
    params, stats = variables["params"], variables["batch_stats"]
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    train_step = make_train_step(model, optimizer, batch_size)
    losses = []
    for key in jax.random.split(key_batches, steps):
        params, stats, opt_state, loss, batch = train_step(params, stats, opt_state, buffer,
                                                           key)
        losses.append(loss)
    losses = [float(loss) for loss in losses]
    return {"model": model, "variables": {"params": params, "batch_stats": stats},
            "losses": losses, "batch": batch, "buffer": buffer}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--critics", type=int, default=2)
    args = parser.parse_args(argv)
    result = train(args.steps, args.batch_size, args.critics)
    losses = result["losses"]
    print(f"TD loss: first 10 steps {sum(losses[:10]) / 10:.4f}, "
          f"last 10 steps {sum(losses[-10:]) / 10:.4f}")
    q_eval = result["model"].apply(result["variables"], joint_batch(result["batch"]), False)
    print(f"eval-mode Q of the last batch, per critic: {jnp.mean(q_eval, axis=1)}")
    return result


if __name__ == "__main__":
    main()
