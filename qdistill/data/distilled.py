"""Data-free calibration data: inputs synthesised from a trained model's BatchNorm statistics.

* ZeroQ (Cai et al. 2020, "ZeroQ: A Novel Zero Shot Quantization Framework", Sec. 3.1, Alg. 1):
  start from Gaussian noise and optimise the *inputs* so that, at every BatchNorm layer, the
  batch mean and standard deviation of the layer's input match the stored running statistics:
  ``min_x sum_i ||mu_i(x) - mu_i||_2^2 + ||sigma_i(x) - sigma_i||_2^2``. Optionally a
  cross-entropy term pushes each sample towards a target class (as in DeepInversion).
* Genie (Jeon et al. 2023, "Genie: Show Me the Data for Quantization", Sec. 3.1): instead of
  optimising pixels, train a small generator together with its latent vectors against the same
  BatchNorm loss, which gives smoother, more varied samples (``method="genie"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qdistill.errors import QDistillError


class _BNStatLoss:
    """Forward hooks on every BatchNorm that accumulate the statistic-matching loss."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.bns:
            raise QDistillError(
                f"{type(model).__name__} has no BatchNorm layer, so there are no statistics to "
                "distil data from; calibrate with real data instead (a few batches suffice)"
            )
        self.terms: list[torch.Tensor] = []
        self.handles = [bn.register_forward_hook(self._hook) for bn in self.bns]

    def _hook(self, bn: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        x = inputs[0]
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        std = torch.sqrt(x.var(dim=dims, unbiased=False) + bn.eps)
        target_std = torch.sqrt(bn.running_var + bn.eps)
        self.terms.append((mean - bn.running_mean).pow(2).sum() + (std - target_std).pow(2).sum())

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.terms).sum()
        self.terms = []
        return loss

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def bn_statistics_loss(model: nn.Module, x: torch.Tensor) -> float:
    """ZeroQ's objective for a batch: how far its BatchNorm statistics are from the running ones."""
    stats = _BNStatLoss(model)
    try:
        was = model.training
        model.eval()
        with torch.no_grad():
            model(x)
        model.train(was)
        return float(stats.pop())
    finally:
        stats.close()


class Generator(nn.Module):
    """A small Genie-style generator: latent -> feature map -> upsampling convs -> image."""

    def __init__(self, input_shape: Sequence[int], latent_dim: int = 64, width: int = 64) -> None:
        super().__init__()
        c, h, w = input_shape
        self.start = (max(1, math.ceil(h / 4)), max(1, math.ceil(w / 4)))
        self.shape = (c, h, w)
        self.fc = nn.Linear(latent_dim, width * self.start[0] * self.start[1])
        self.width = width
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width // 2, c, 3, padding=1),
        )
        self.out_bn = nn.BatchNorm2d(c, affine=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).reshape(-1, self.width, *self.start)
        x = self.body(x)
        x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return self.out_bn(x)


class _Pixels(nn.Module):
    """ZeroQ: the inputs themselves are the parameters."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x)

    def forward(self) -> torch.Tensor:
        return self.x


class _GenieSource(nn.Module):
    """Genie: a generator and its latent vectors are the parameters."""

    def __init__(self, input_shape: Sequence[int], z: torch.Tensor) -> None:
        super().__init__()
        self.gen = Generator(input_shape, latent_dim=z.shape[1])
        self.z = nn.Parameter(z)

    def forward(self) -> torch.Tensor:
        return self.gen(self.z)


def distilled_data(
    model: nn.Module,
    n: int,
    input_shape: Sequence[int],
    *,
    batch_size: int = 64,
    steps: int = 200,
    lr: float = 0.1,
    num_classes: int | None = None,
    class_weight: float = 0.0,
    method: str = "zeroq",
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """``n`` synthetic inputs whose BatchNorm statistics match ``model``'s running statistics.

    ``method="zeroq"`` optimises the inputs directly; ``"genie"`` trains a generator and its
    latents per batch. ``class_weight > 0`` adds a cross-entropy term towards a random target
    class per sample (needs ``num_classes``). Deterministic for a given ``seed``.
    """
    if method not in ("zeroq", "genie"):
        raise QDistillError(f"method={method!r}; use 'zeroq' or 'genie'")
    if class_weight > 0 and not num_classes:
        raise QDistillError("class_weight > 0 needs num_classes")
    stats = _BNStatLoss(model)
    was_training = model.training
    model.eval()
    params_state = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    batches = []
    try:
        n_batches = math.ceil(n / batch_size)
        bar = tqdm(
            total=n_batches * steps,
            desc=f"distilled data ({method})",
            disable=not progress,
            leave=False,
        )
        for b in range(n_batches):
            size = min(batch_size, n - b * batch_size)
            targets = torch.randint(0, num_classes or 1, (size,), generator=g)
            if method == "zeroq":
                source: nn.Module = _Pixels(torch.randn(size, *input_shape, generator=g))
            else:
                torch.manual_seed(seed * 1000 + b)
                source = _GenieSource(input_shape, torch.randn(size, 64, generator=g))
            opt = torch.optim.Adam(source.parameters(), lr=lr if method == "zeroq" else lr / 10)
            for _ in range(steps):
                logits = model(source())
                loss = stats.pop()
                if class_weight > 0:
                    loss = loss + class_weight * F.cross_entropy(logits, targets)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(bn_loss=f"{float(loss.detach()):.3f}")
            with torch.no_grad():
                batches.append(source().detach())
                stats.terms = []
        bar.close()
    finally:
        stats.close()
        for p, req in zip(model.parameters(), params_state, strict=True):
            p.requires_grad_(req)
        model.train(was_training)
    return torch.cat(batches)[:n]


def distilled_loader(
    teacher: nn.Module,
    n: int,
    input_shape: Sequence[int],
    batch_size: int = 64,
    **kwargs,
) -> torch.utils.data.DataLoader:
    """Distilled inputs labelled by the teacher's own predictions, for data-free training.

    With ``KD(alpha=1)`` the teacher's soft targets are the only supervision (the labels only
    feed the running accuracy in the progress bar), which is ZeroQ's data-free setting applied
    to quantized distillation.
    """
    x = distilled_data(teacher, n, input_shape, **kwargs)
    was = teacher.training
    teacher.eval()
    with torch.no_grad():
        y = torch.cat([teacher(b).argmax(dim=-1) for b in x.split(256)])
    teacher.train(was)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
