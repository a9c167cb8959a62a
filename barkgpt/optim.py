"""Optimizers: AdamW (the default) and Muon for hidden weight matrices beside AdamW for the rest.

Muon (Keller Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) replaces each 2-D
hidden weight's momentum update by its nearest semi-orthogonal matrix, computed with a quintic
Newton-Schulz iteration. :class:`Muon` follows ``torch.optim.Muon`` step for step (same momentum,
Nesterov, coefficients, weight decay and learning-rate adjustment; a test checks the two give the
same update) with one difference: the Newton-Schulz dtype is a parameter. ``torch.optim.Muon``
always iterates in bfloat16, which is fast on GPUs and ~100x slower than fp32 on CPUs without
bf16 units (this project's 2-core machine); :func:`build_optimizers` picks bf16 on CUDA and fp32
elsewhere.

Embeddings, the output head, norms and biases stay on AdamW (as in the Muon write-up and
modded-nanogpt), each kind with its own learning rate.
"""

from __future__ import annotations

import math

import torch

from barkgpt.config import TrainConfig
from barkgpt.model import GPT

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's (and Keller Jordan's) quintic


def newton_schulz(
    g: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximately orthogonalize a matrix (A, B), or a stack of them (L, A, B): ``U S' V^T`` with
    ``S'`` near 1, from the SVD ``U S V^T`` of each; the iteration of ``torch.optim.Muon``, computed
    in ``dtype``. A stack runs as batched matmuls, which on a CPU costs about what one matrix does.

    Returns:
        A tensor of ``g``'s shape, in ``dtype``.
    """
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        if x.dim() == 2:
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        else:
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (hidden weight matrices).

    Per step, for each parameter ``p`` (A, B) with gradient ``g``: ``buf = lerp(buf, g, 1 - momentum)``;
    ``u = lerp(g, buf, momentum)`` (Nesterov) or ``buf``; ``u = newton_schulz(u)``;
    ``p *= 1 - lr * weight_decay``; ``p -= lr * adjust(A, B) * u`` where ``adjust`` is
    ``sqrt(max(1, A/B))`` (``original``) or ``0.2 * sqrt(max(A, B))`` (``match_rms_adamw``, which
    makes the update's RMS match AdamW's so the same learning rate suits both; Liu et al. 2025,
    "Muon is Scalable for LLM Training").

    Args:
        params: 2-D tensors (or param groups of them).
        lr, weight_decay, momentum, nesterov, ns_steps, adjust_lr_fn: as ``torch.optim.Muon``.
        ns_dtype: the Newton-Schulz dtype (``torch.optim.Muon`` uses bfloat16).

    Raises:
        ValueError: a parameter that is not 2-D, or an unknown ``adjust_lr_fn``.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "original",
        ns_dtype: torch.dtype = torch.float32,
    ):
        if adjust_lr_fn not in ("original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}; give it to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss, if given.

        Parameters of one shape are updated together: foreach momentum ops and one batched
        Newton-Schulz over their stacked updates (the result equals one matrix at a time).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for (A, B), params in by_shape.items():
                grads = [p.grad for p in params]
                bufs = []
                for p in params:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    bufs.append(self.state[p]["momentum_buffer"])
                torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
                updates = torch._foreach_lerp(grads, bufs, group["momentum"]) if group["nesterov"] else bufs
                u = newton_schulz(torch.stack(updates), group["ns_steps"], dtype=group["ns_dtype"])  # (L, A, B)
                scale = math.sqrt(max(1, A / B)) if group["adjust_lr_fn"] == "original" else 0.2 * math.sqrt(max(A, B))
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
                torch._foreach_add_(params, list(u.to(params[0].dtype).unbind(0)), alpha=-group["lr"] * scale)
        return loss


def build_optimizers(model: GPT, cfg: TrainConfig, device: str) -> list[torch.optim.Optimizer]:
    """The optimizers for a run: ``[AdamW]``, or ``[AdamW, Muon]`` with ``cfg.optimizer == "muon"``.

    AdamW: weight decay on 2-D weights only (nanoGPT's split), fused kernels where available.
    Muon takes the 2-D matrices inside the transformer blocks (attention and MLP projections; not
    embeddings, the output head, the MoE router, or 3-D expert stacks) with
    ``cfg.muon_learning_rate``, ``cfg.muon_ns_steps`` and ``match_rms_adamw``. Each param group carries ``lr_scale``, its
    learning rate relative to ``cfg.learning_rate``, which the schedule multiplies in.

    ``cfg.optimizer`` is ``adamw`` or ``muon`` (``TrainConfig`` refuses any other name).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    muon = {}
    if cfg.optimizer == "muon":
        muon = {n: p for n, p in params.items() if p.dim() == 2 and ".h." in n and "router" not in n}
    rest = [(n, p) for n, p in params.items() if n not in muon]
    fused = device.startswith("cuda") or device == "cpu"
    groups = [
        {"params": [p for n, p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": [p for n, p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)
    ]
    if muon:
        lr = cfg.muon_learning_rate if cfg.muon_learning_rate is not None else cfg.learning_rate
        ns_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        optimizers.append(
            Muon(
                [{"params": list(muon.values()), "lr_scale": lr / cfg.learning_rate}],
                lr=lr,
                weight_decay=cfg.weight_decay,
                adjust_lr_fn="match_rms_adamw",
                ns_steps=cfg.muon_ns_steps,
                ns_dtype=ns_dtype,
            )
        )
    return optimizers
