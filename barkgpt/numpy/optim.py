"""AdamW, the warmup + cosine schedule and gradient clipping, over the model's flat buffers.

Each is the PyTorch backend's, step for step: ``torch.optim.AdamW``'s update (decoupled weight
decay, bias-corrected moments, ``eps`` outside the square root), weight decay on 2-D tensors only
(``optim.build_optimizers``' groups: embeddings, projections and an untied head; not norms or
biases), ``torch.nn.utils.clip_grad_norm_``'s scaling, and the shared ``common.get_lr`` schedule.
"""

from __future__ import annotations

import math

import numpy as np

from barkgpt.common import BarkError, get_lr
from barkgpt.config import TrainConfig

__all__ = ["AdamW", "clip_grad_norm", "get_lr"]  # get_lr: common's schedule, shared with barkgpt.train


def clip_grad_norm(flat_grad: np.ndarray, max_norm: float) -> float:
    """Scale the gradient in place so its global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_``: ``g *= min(1, max_norm / (norm + 1e-6))``.

    Returns:
        The norm before clipping.
    """
    norm = float(np.sqrt(np.dot(flat_grad, flat_grad)))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        flat_grad *= flat_grad.dtype.type(coef)
    return norm


class AdamW:
    """AdamW (Loshchilov & Hutter 2019) over a model's flat parameter buffer, as
    ``torch.optim.AdamW``: for each step ``t``, ``p *= 1 - lr * wd`` (2-D tensors only),
    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    Args:
        model: a :class:`barkgpt.numpy.model.GPT` (its ``flat``, ``flat_grad``, ``params``).
        cfg: ``weight_decay``, ``beta1``, ``beta2`` (the learning rate comes with each :meth:`step`).
        eps: torch's default 1e-8.

    Raises:
        BarkError: ``cfg.optimizer`` is not ``adamw`` (Muon is the torch backend's).
    """

    def __init__(self, model, cfg: TrainConfig, eps: float = 1e-8):
        if cfg.optimizer != "adamw":
            raise BarkError(
                f"the numpy backend trains with AdamW only, not {cfg.optimizer}; pass --optimizer adamw or --backend torch"
            )
        self.model, self.eps = model, eps
        self.beta1, self.beta2, self.weight_decay = cfg.beta1, cfg.beta2, cfg.weight_decay
        self.exp_avg, self.exp_avg_sq = np.zeros_like(model.flat), np.zeros_like(model.flat)
        self.decay = np.zeros_like(model.flat)  # 1 on 2-D tensors (weight decay), 0 on norms and biases
        offset = 0
        for p in model.params.values():
            self.decay[offset : offset + p.size] = 1.0 if p.ndim >= 2 else 0.0
            offset += p.size
        self.step_count = 0

    def step(self, lr: float) -> None:
        """One update of every parameter from ``model.flat_grad``, at learning rate ``lr``."""
        p, g, m, v = self.model.flat, self.model.flat_grad, self.exp_avg, self.exp_avg_sq
        self.step_count += 1
        t = self.step_count
        if self.weight_decay:
            p *= 1.0 - lr * self.weight_decay * self.decay
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        v += (1.0 - self.beta2) * g * g
        denom = np.sqrt(v) / math.sqrt(1.0 - self.beta2**t) + self.eps
        p -= (lr / (1.0 - self.beta1**t)) * m / denom

    def state_dict(self) -> dict[str, np.ndarray]:
        """The moments as flat arrays and the step count, for ``optimizer.safetensors``."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": np.array([self.step_count], dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays.

        Raises:
            BarkError: moments of another size (another model).
        """
        if state["exp_avg"].shape != self.exp_avg.shape or state["exp_avg_sq"].shape != self.exp_avg_sq.shape:
            raise BarkError("the saved optimizer state belongs to another model; resume with the same model flags")
        self.exp_avg[...], self.exp_avg_sq[...] = state["exp_avg"], state["exp_avg_sq"]
        self.step_count = int(state["step"][0])
