"""A CrossQ-style critic ensemble with batch renormalization, in PyTorch.

The torch counterpart of ``crossq_critic_jax.py``: CrossQ (Bhatt et al., ICLR 2024) drops
the target network and puts batch (re)normalization in the critic, with the (s, a) and
(s', a') batches going through the critic *together*, as one concatenated batch, so both
are normalized with the same statistics.  The ensemble is a ``ModuleList`` of critics,
each with its own renorm layers (own moving statistics and ``num_batches_tracked``).
Each training step is one joint forward in ``train()`` mode, so every renorm layer's
step advances once per step; the targets come from the second half of the same forward,
detached.  Evaluation (e.g. the actor's loss in a full agent) uses ``eval()``.

Run ``python examples/crossq_critic_torch.py --steps 300``: a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from portable_brn.adapters.torch import BatchRenorm1d

OBS_DIM, ACT_DIM = 6, 2
GAMMA = 0.5  # a short horizon: the demo's TD targets settle within a few hundred steps


def _renorm(num_features: int, warmup_steps: int) -> BatchRenorm1d:
    """torch convention: momentum is the weight of the new value (the paper's alpha);
    r = 1, d = 0 (plain batch norm) until the moving statistics have warmed up."""
    return BatchRenorm1d(num_features, momentum=0.01, warmup_steps=warmup_steps,
                         r_max=3.0, d_max=5.0)


class Critic(nn.Module):
    """Q(s, a): renorm on the input and after each hidden layer, as in CrossQ."""

    def __init__(self, hidden: int = 64, warmup_steps: int = 20) -> None:
        super().__init__()
        width = OBS_DIM + ACT_DIM
        self.net = nn.Sequential(
            _renorm(width, warmup_steps),
            nn.Linear(width, hidden), nn.ReLU(), _renorm(hidden, warmup_steps),
            nn.Linear(hidden, hidden), nn.ReLU(), _renorm(hidden, warmup_steps),
            nn.Linear(hidden, 1))

    def forward(self, obs_act: torch.Tensor) -> torch.Tensor:
        return self.net(obs_act)[:, 0]


class CriticEnsemble(nn.Module):
    """``n_critics`` independent critics: outputs ``(n_critics, batch)``."""

    def __init__(self, n_critics: int = 2, hidden: int = 64, warmup_steps: int = 20) -> None:
        super().__init__()
        self.critics = nn.ModuleList(Critic(hidden, warmup_steps) for _ in range(n_critics))

    def forward(self, obs_act: torch.Tensor) -> torch.Tensor:
        return torch.stack([critic(obs_act) for critic in self.critics])


def synthetic_transitions(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random (s, a, r, s', done) with a smooth reward of (s, a)."""
    obs = torch.randn(n, OBS_DIM, generator=generator)
    act = torch.tanh(torch.randn(n, ACT_DIM, generator=generator))
    reward = torch.sin(obs[:, 0]) + 0.5 * obs[:, 1] * act[:, 0] - 0.1 * act.square().sum(-1)
    next_obs = 0.9 * obs + 0.3 * torch.randn(n, OBS_DIM, generator=generator)
    done = (torch.arange(n) % 50 == 49).float()
    return {"obs": obs, "act": act, "reward": reward, "next_obs": next_obs, "done": done}


def policy(obs: torch.Tensor) -> torch.Tensor:
    """A fixed deterministic policy for the next actions a' (a full agent learns it)."""
    return torch.tanh(obs[:, :ACT_DIM] - 0.5 * obs[:, ACT_DIM:2 * ACT_DIM])


def joint_batch(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[(s, a); (s', a')]``: one batch of 2B rows, so both halves share statistics."""
    current = torch.cat([batch["obs"], batch["act"]], dim=-1)
    following = torch.cat([batch["next_obs"], policy(batch["next_obs"])], dim=-1)
    return torch.cat([current, following])


def train_step(model: CriticEnsemble, optimizer: torch.optim.Optimizer,
               batch: dict[str, torch.Tensor]) -> float:
    """One critic update: one joint forward in training mode (one renorm step), a TD loss
    against the ensemble's min over members of Q(s', a'), no target network."""
    model.train()
    q_all = model(joint_batch(batch))
    half = batch["reward"].shape[0]
    q, q_next = q_all[:, :half], q_all[:, half:]
    target = batch["reward"] + GAMMA * (1.0 - batch["done"]) * q_next.min(dim=0).values
    loss = (q - target.detach()).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def train(steps: int = 300, batch_size: int = 64, n_critics: int = 2, hidden: int = 64,
          seed: int = 0) -> dict[str, Any]:
    """Train the ensemble on a fixed buffer of synthetic transitions; returns the model,
    its optimizer, the per-step losses and the last batch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    buffer = synthetic_transitions(2048, generator)
    model = CriticEnsemble(n_critics, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        index = torch.randint(0, 2048, (batch_size,), generator=generator)
        batch = {name: values[index] for name, values in buffer.items()}
        losses.append(train_step(model, optimizer, batch))
    return {"model": model, "optimizer": optimizer, "losses": losses, "batch": batch}


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
    model = result["model"].eval()
    with torch.no_grad():
        q_eval = model(joint_batch(result["batch"]))
    print(f"eval-mode Q of the last batch, per critic: {q_eval.mean(dim=1)}")
    return result


if __name__ == "__main__":
    main()
