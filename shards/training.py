"""Training loops: denoising (epsilon-prediction) for shards, and the shared
minibatch sampler. Every loop is a pure function of its data and seed.

Denoising loss (DDPM, Ho et al. 2020, eq. 14):
    L = E_{x_0 ~ D, t ~ U{0..T-1}, eps ~ N(0, I)} || eps - eps_theta(x_t, t) ||^2,
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
and for labelled data eps_theta(x_t, t, y) with (x_0, y) drawn together; for captioned
data eps_theta(x_t, t, c) with (x_0, c) drawn together and c replaced by the null
text with probability `text.CAPTION_DROPOUT` (so the model also learns eps_theta(x_t,
t, null), classifier-free guidance's unconditional branch).

Denoisers keep an exponential moving average of their weights (diffusers' `EMAModel`,
with its warm-up: decay_k = min(0.9999, 1 - (1 + k)^(-2/3)) at step k, about 0.988
after 800 steps), and the trained model ends holding the averaged weights: what is
saved and sampled. Routers (heads, classifier) are plain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .settings import PRECISIONS


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA device that supports it, or
    a CPU with AVX-512 BF16 or AMX tiles. Elsewhere bfloat16 autocast is emulated: a
    studios training step took 13x as long as in float32 on an AVX2 CPU
    (docs/performance.md), where a CPU with AVX-512 BF16 took 0.67x."""
    device = torch.device(device)
    if device.type == "cuda":  # Ampere and later; older cards emulate it
        return torch.cuda.get_device_properties(device).major >= 8
    if device.type != "cpu":
        return False
    cpu = torch.cpu  # private probes, the only ones torch has; absent: assume emulation
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one denoiser (a full shard, the base, or a LoRA)."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 50
    ema: bool = False  # end with the EMA of the weights (denoisers; see module docstring)
    # "bf16": the denoiser's forward pass under bfloat16 autocast (weights, optimiser
    # and loss stay float32); pays off on CPUs with native bfloat16 (docs/performance.md).
    # "auto": bf16 where the device that trains computes it natively, decided by each
    # run (a later `cdm add` on another host decides for that host), else float32
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; allowed: {list(PRECISIONS)}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch_size and lr must be positive: {self}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.steps}]")

    def resolved_precision(self, device: torch.device | str) -> str:
        """What a run on `device` computes in: "bf16" (autocast) or "fp32"."""
        bf16 = self.precision == "bf16" or (self.precision == "auto" and native_bf16(device))
        return "bf16" if bf16 else "fp32"

    def with_steps(self, steps: int) -> TrainConfig:
        """The same settings for `steps` steps (the warm-up cut to a fifth of them)."""
        return replace(self, steps=steps, warmup_steps=min(self.warmup_steps, steps // 5))

    def to_dict(self) -> dict:
        return asdict(self)


def forward_noise(
    scheduler: DDPMScheduler, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw t ~ U{0..T-1} and eps ~ N(0, I); return (x_t, t, eps)."""
    n = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return scheduler.add_noise(x0, eps, t), t, eps


def optimize(model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor], config: TrainConfig,
             *, weight_decay: float = 0.0, device: torch.device | str = "cpu",
             desc: str = "train", progress: bool = True) -> float:
    """The optimisation loop every trainer shares: AdamW on the parameters that
    require grad, cosine schedule with warm-up, `config.steps` steps of
    `batch_loss()` (which draws its own batch). Leaves `model` in eval mode.

    Returns:
        The mean loss over the last 10% of steps (at least one step).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    model.to(device).train()
    ema = (EMAModel(params, decay=0.9999, use_ema_warmup=True, power=2 / 3, foreach=True)
           if config.ema else None)
    tail = max(1, config.steps // 10)
    recent: list[float] = []
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if ema is not None:
            ema.step(params)
        if step >= config.steps - tail:
            recent.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    if ema is not None:
        ema.copy_to(params)
    model.eval()
    return float(sum(recent) / len(recent))


def train_denoiser(
    model: torch.nn.Module,
    images: torch.Tensor,
    scheduler: DDPMScheduler,
    config: TrainConfig,
    seed: int,
    *,
    labels: torch.Tensor | None = None,
    text=None,
    device: torch.device | str = "cpu",
    desc: str = "train",
    progress: bool = True,
) -> float:
    """Fit `model` (in place) to predict the noise added to `images` (given their
    `labels`, for a class-conditional model; their captions `text`, a
    `text.Captions`, for a text-conditional one).

    Only parameters with `requires_grad` are optimised (so a peft model trains its
    LoRA weights only). Batches, timesteps and noise come from a CPU generator seeded
    with `seed`, so the result is a function of (initial weights, images, seed).

    Returns:
        The mean loss over the last 10% of steps (at least one step).
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    bf16 = config.resolved_precision(device) == "bf16"

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        x_t, t, eps = forward_noise(scheduler, images[idx], generator)
        if text is not None:
            cond = text.draw(idx, generator).to(device).unet_kwargs()
        else:
            cond = {"class_labels": None if labels is None else labels[idx].to(device)}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x_t.to(device), t.to(device), **cond).sample
        return torch.nn.functional.mse_loss(out.float(), eps.to(device))

    return optimize(model, batch_loss, config, device=device, desc=desc, progress=progress)
