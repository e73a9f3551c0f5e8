"""The shard classifier f(x_t, t) -> logits over shards, and the mixture weights.

Trained with cross-entropy on forward-noised samples (x_0 from D_i, any t, label i),
drawn with class frequencies pi_i, so softmax(f)_i ~= pi_i p_t^i(x_t) / sum_j pi_j p_t^j.
For shard priors lambda_i and any subset S (DESIGN.md):

    (1) w_i^S(x_t, t) = lambda_i p_t^i(x_t) / sum_{j in S} lambda_j p_t^j(x_t)
    (2)               = softmax_{i in S}( f_i(x_t, t) + log lambda_i - log pi_i )

Masking the logits outside S before the softmax is (2) exactly, so one classifier
serves every licence, forgetting state and Shapley coalition.

Labelled stores: the classifier also takes the label y (an embedding added to the
time embedding) and is trained on draws y ~ uniform over labels, i ~ uniform over the
contributors holding y, x_0 ~ D_i^y, so softmax(f(x_t, t, y))_i ~= p_t^i(x_t | y) /
sum_{j holds y} p_t^j(x_t | y): the scores are log p_t^i(x_t | y) up to a constant of
the row, and the sampler adds log lambda_i(y) over the contributors of S holding y.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D

from .training import TrainConfig, forward_noise, optimize


class ShardClassifier(ModelMixin, ConfigMixin):
    """Time-conditioned CNN: (x_t, t) -> logits over `contributor_ids`.

    Saved by `save_pretrained` as `config.json` + `diffusion_pytorch_model.safetensors`;
    the config carries the shard order and the training class frequencies.
    """

    @register_to_config
    def __init__(
        self,
        contributor_ids: list[str] = ("a", "b"),
        train_frequencies: list[float] | None = None,
        in_channels: int = 1,
        block_out_channels: list[int] = (32, 64),
        time_embed_dim: int = 64,
        num_labels: int = 0,
    ):
        super().__init__()
        n = len(contributor_ids)
        if n < 1:
            raise ValueError("ShardClassifier needs at least one contributor id")
        freqs = train_frequencies or [1.0 / n] * n
        if len(freqs) != n:
            raise ValueError(f"train_frequencies has {len(freqs)} entries, expected {n}")
        self.register_buffer("log_train_freq", torch.tensor(freqs).log(), persistent=False)
        c0 = block_out_channels[0]
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(c0, time_embed_dim)
        self.label_embedding = torch.nn.Embedding(num_labels, time_embed_dim) if num_labels else None
        self.conv_in = torch.nn.Conv2d(in_channels, c0, 3, padding=1)
        blocks, prev = [], c0
        for i, ch in enumerate(block_out_channels):
            blocks.append(ResnetBlock2D(in_channels=prev, out_channels=ch, temb_channels=time_embed_dim, groups=8))
            if i < len(block_out_channels) - 1:
                blocks.append(torch.nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            prev = ch
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm_out = torch.nn.GroupNorm(8, prev)
        self.head = torch.nn.Linear(prev, n)

    @property
    def contributor_ids(self) -> list[str]:
        return list(self.config.contributor_ids)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, n_shards) (given labels `y` (B,) in a labelled store)."""
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        temb = self.time_embedding(self.time_proj(t).to(x_t.dtype))
        if self.label_embedding is not None:
            if y is None:
                raise ValueError("this classifier is class-conditional: pass the labels y")
            temb = temb + self.label_embedding(torch.as_tensor(y, device=x_t.device).expand(x_t.shape[0]))
        h = self.conv_in(x_t)
        for block in self.blocks:
            h = block(h, temb) if isinstance(block, ResnetBlock2D) else block(h)
        h = torch.nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)

    def log_ratios(self, x_t: torch.Tensor, t: torch.Tensor | int,
                   y: torch.Tensor | None = None) -> torch.Tensor:
        """f_i - log pi_i (B, n): log p_t^i(x_t) up to a constant shared by all i, the
        router's scores in eq. (2); labelled: f_i(x_t, t, y) (module docstring)."""
        if self.label_embedding is not None:
            return self(x_t, t, y)
        return self(x_t, t) - self.log_train_freq


def mixture_weights(
    logits: torch.Tensor,
    log_prior: torch.Tensor,
    log_train_freq: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """Equation (2): posterior over shards restricted to the `allowed` mask.

    Args:
        logits: (B, n) classifier logits.
        log_prior: (n,) log lambda_i (any additive constant cancels).
        log_train_freq: (n,) log pi_i of the classifier's training draws.
        allowed: (n,) or (B, n) bool, the subset S (one per sample if 2-d); at least
            one True per row.

    Returns:
        (B, n) weights, zero outside S, each row summing to 1.
    """
    return posterior_weights(logits - log_train_freq, log_prior, allowed)


def posterior_weights(log_ratios: torch.Tensor, log_prior: torch.Tensor,
                      allowed: torch.Tensor) -> torch.Tensor:
    """softmax over i in S of (s_i + log lambda_i), for any router's scores s_i that
    equal log p_t^i(x_t) up to a constant shared by all i (eq. 2 and heads.py eq. 6).

    Args:
        log_ratios: (B, n) router scores.
        log_prior: (n,) log lambda_i, or (B, n) per sample (lambda_i(y_b), labelled stores).
        allowed: (n,) or (B, n) bool, the subset S; at least one True per row.

    Returns:
        (B, n) weights, zero outside S, each row summing to 1.
    """
    if not bool(allowed.any(dim=-1).all()):
        raise ValueError("the allowed subset S is empty")
    z = (log_ratios + log_prior).masked_fill(~allowed, float("-inf"))
    return torch.softmax(z, dim=-1)


def train_classifier(
    classifier: ShardClassifier,
    datasets: list[torch.Tensor],
    scheduler: DDPMScheduler,
    config: TrainConfig,
    seed: int,
    *,
    labels: list[torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> float:
    """Cross-entropy on forward-noised samples, label = shard index.

    Shards are drawn with the frequencies in the classifier's config (uniform by
    default), images uniformly within the drawn shard, t uniformly. With `labels`
    (one tensor per dataset): y uniformly over the labels held, a shard uniformly
    among those holding y, an image uniformly among its images of y.

    Returns:
        The mean loss over the last 10% of steps.
    """
    if len(datasets) != len(classifier.config.contributor_ids):
        raise ValueError(f"{len(datasets)} datasets for {len(classifier.config.contributor_ids)} classifier outputs")
    generator = torch.Generator().manual_seed(seed)
    freqs = classifier.log_train_freq.exp().cpu()
    pool = torch.cat(datasets)
    sizes = torch.tensor([d.shape[0] for d in datasets])
    offsets = torch.cumsum(sizes, 0) - sizes

    if labels is not None:
        return _train_labelled(classifier, datasets, labels, scheduler, config, generator,
                               device, progress)

    def batch_loss() -> torch.Tensor:
        shard = torch.multinomial(freqs, config.batch_size, replacement=True, generator=generator)
        within = (torch.rand(config.batch_size, generator=generator) * sizes[shard]).long()
        x_t, t, _ = forward_noise(scheduler, pool[offsets[shard] + within], generator)
        logits = classifier(x_t.to(device), t.to(device))
        return torch.nn.functional.cross_entropy(logits, shard.to(device))

    return optimize(classifier, batch_loss, config, weight_decay=1e-4, device=device,
                    desc="classifier", progress=progress)


def _train_labelled(classifier, datasets, labels, scheduler, config, generator, device,
                    progress) -> float:
    """`train_classifier` with labels: groups (shard i, label y) of the pooled images,
    y uniform over the labels held, then a group of y uniformly, then an image."""
    pool = torch.cat(datasets)
    pool_labels = torch.cat(labels)
    pool_shard = torch.cat([torch.full((len(d),), i) for i, d in enumerate(datasets)])
    width = int(pool_labels.max()) + 1
    group_of = pool_shard * width + pool_labels  # one id per (shard, label)
    order = torch.argsort(group_of, stable=True)
    groups, sizes = torch.unique_consecutive(group_of[order], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    group_label = groups % width
    held = torch.unique(group_label)
    per_label = [torch.nonzero(group_label == y).flatten() for y in held.tolist()]

    def batch_loss() -> torch.Tensor:
        b = config.batch_size
        which = torch.randint(0, len(held), (b,), generator=generator)
        pick = torch.rand(b, generator=generator)
        g = torch.stack([per_label[w][int(p * len(per_label[w]))] for w, p in
                         zip(which.tolist(), pick.tolist(), strict=True)])
        within = (torch.rand(b, generator=generator) * sizes[g]).long()
        idx = order[starts[g] + within]
        x_t, t, _ = forward_noise(scheduler, pool[idx], generator)
        logits = classifier(x_t.to(device), t.to(device), pool_labels[idx].to(device))
        return torch.nn.functional.cross_entropy(logits, pool_shard[idx].to(device))

    return optimize(classifier, batch_loss, config, weight_decay=1e-4, device=device,
                    desc="classifier", progress=progress)


def expand_classifier(old: ShardClassifier, contributor_ids: list[str]) -> ShardClassifier:
    """A classifier over `contributor_ids` (old ids plus new ones) that keeps the old
    weights and head rows; new head rows start at zero (continual learning)."""
    missing = [c for c in old.config.contributor_ids if c not in contributor_ids]
    if missing:
        raise ValueError(f"expand_classifier cannot drop contributors: {missing}")
    cfg = {k: v for k, v in old.config.items() if not k.startswith("_")}
    cfg.update(contributor_ids=list(contributor_ids), train_frequencies=None)
    new = ShardClassifier(**cfg)
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("head.")}
    new.load_state_dict(state, strict=False)
    with torch.no_grad():
        new.head.weight.zero_()
        new.head.bias.zero_()
        for i, cid in enumerate(old.config.contributor_ids):
            j = list(contributor_ids).index(cid)
            new.head.weight[j] = old.head.weight[i]
            new.head.bias[j] = old.head.bias[i]
    return new
