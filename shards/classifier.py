"""The shard classifier f(x_t, t) -> logits over shards, and the mixture weights.

Trained with cross-entropy on forward-noised samples (x_0 from D_i, any t, label i),
drawn with class frequencies pi_i, so softmax(f)_i ~= pi_i p_t^i(x_t) / sum_j pi_j p_t^j.
For shard priors lambda_i and any subset S (docs/maths.md):

    (1) w_i^S(x_t, t) = lambda_i p_t^i(x_t) / sum_{j in S} lambda_j p_t^j(x_t)
    (2)               = softmax_{i in S}( f_i(x_t, t) + log lambda_i - log pi_i )

Masking the logits outside S before the softmax is (2) exactly, so one classifier
serves every licence, forgetting state and Shapley coalition.

Labelled stores: the classifier also takes the label y (an embedding added to the
time embedding) and is trained on draws y ~ uniform over labels, i ~ uniform over the
contributors holding y, x_0 ~ D_i^y, so softmax(f(x_t, t, y))_i ~= p_t^i(x_t | y) /
sum_{j holds y} p_t^j(x_t | y): the scores are log p_t^i(x_t | y) up to a constant of
the row, and the sampler adds log lambda_i(y) over the contributors of S holding y.

`JointRouter` is this router as the store builds, adds and forgets it (router.py):
STORE/classifier/v<NNNN>/ holds its versions, the manifest names the live one. It saw
everyone's data, so a forget retrains it from scratch on the others' kept data, and
an add fine-tunes an expanded copy on replayed data of every live contributor.
"""

from __future__ import annotations

import shutil

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D

from .errors import StoreError
from .faults import crashpoint
from .files import files_hash
from .models import LOAD, seeded
from .router import RouterUpdate
from .routing import posterior_weights
from .shard import derived_seed
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


class ClassifierSwitch(RouterUpdate):
    """A new classifier version (or none, when no contributor is live): saved and named
    in the manifest by `apply`, the version it replaces deleted by `finish`."""

    def __init__(self, root, trained: tuple[ShardClassifier, dict] | None):
        self.root, self.trained, self.previous = root, trained, None

    def apply(self, manifest: dict) -> None:
        self.previous = manifest.get("classifier")
        if self.trained is None:
            manifest["classifier"] = None
            return
        classifier, meta = self.trained
        version = (self.previous or {}).get("version", 0) + 1
        path = f"classifier/v{version:04d}"
        classifier.save_pretrained(self.root / path)
        manifest["classifier"] = {**meta, "version": version, "path": path,
                                  "contributor_ids": list(classifier.config.contributor_ids),
                                  "weights_hash": files_hash(self.root / path)}
        self.path = path

    def finish(self) -> None:
        crashpoint("classifier:switched")
        named = None if self.trained is None else self.path
        if self.previous and self.previous["path"] != named:
            shutil.rmtree(self.root / self.previous["path"], ignore_errors=True)


class JointRouter:
    """Router `joint` (router.py): one classifier that saw every contributor's data."""

    kind = "joint"
    public_use = None
    retrains = "classifier"

    def setup(self, root, manifest, public, public_labels, public_captions=None) -> None:
        pass

    def check_state(self, store) -> None:
        if store.pending_purges:
            raise StoreError(f"purge pending for {store.pending_purges}; add after it finishes")

    def check_data(self, store, data) -> None:
        pass

    def contributor_part(self, store, data, scheduler, device, progress) -> dict:
        return {}

    def _new(self, store, ids: list[str]) -> ShardClassifier:
        return ShardClassifier(contributor_ids=ids, in_channels=store.image_shape[0],
                               block_out_channels=list(store.config.classifier_channels),
                               num_labels=store.num_labels)

    def train(self, store, device, progress) -> ClassifierSwitch:
        """From scratch, deterministic in (sorted live ids, their data, store seed): a
        store that retrains it after removing c equals a store that never had c."""
        ids = store.contributor_ids
        if not ids:
            return ClassifierSwitch(store.root, None)
        seed = derived_seed(store.config.seed, "classifier")
        with seeded(seed):
            classifier = self._new(store, ids)
        kept = [store.contributor_data(c) for c in ids]
        loss = train_classifier(classifier, [k[0] for k in kept], store.noise_schedule(),
                                store.config.classifier_train, seed,
                                labels=[k[1] for k in kept] if store.num_labels else None,
                                device=device, progress=progress)
        return ClassifierSwitch(store.root, (classifier.cpu(), {
            "trained": "scratch", "steps": store.config.classifier_train.steps,
            "final_loss": loss}))

    def extend(self, store, data, device, progress) -> ClassifierSwitch:
        """A new output for `data`'s contributor, fine-tuned on replayed data of every
        live contributor and the new one's (from scratch if none is live)."""
        cid, config = data.contributor_id, store.config
        if store.manifest["classifier"] is None:  # every earlier contributor was forgotten
            seed = derived_seed(config.seed, "classifier")
            with seeded(seed):
                classifier = self._new(store, [cid])
            loss = train_classifier(classifier, [data.images], store.noise_schedule(),
                                    config.classifier_train, seed, device=device,
                                    progress=progress,
                                    labels=None if data.labels is None else [data.labels])
            return ClassifierSwitch(store.root, (classifier.cpu(), {
                "trained": "scratch", "steps": config.classifier_train.steps, "final_loss": loss}))
        ids = sorted([*store.manifest["contributors"], cid])
        version = store.manifest["classifier"]["version"] + 1
        seed = derived_seed(config.seed, "classifier-update", str(version))
        with seeded(seed):
            classifier = expand_classifier(self.load(store), ids)
        kept = {c: store.contributor_data(c) for c in store.manifest["contributors"]}
        kept[cid] = (data.images, data.labels)
        train = TrainConfig(**{**config.classifier_train.to_dict(),
                               "steps": config.classifier_update_steps, "warmup_steps": 0})
        loss = train_classifier(classifier, [kept[c][0] for c in ids], store.noise_schedule(),
                                train, seed, device=device, progress=progress,
                                labels=[kept[c][1] for c in ids] if store.num_labels else None)
        return ClassifierSwitch(store.root, (classifier.cpu(), {
            "trained": "update", "steps": train.steps, "final_loss": loss}))

    def derived_paths(self, contributor_id: str, entry: dict) -> list[str]:
        return []

    def staging_paths(self, contributor_id: str) -> list[str]:
        return []

    def describe(self, store) -> str:
        c = store.manifest["classifier"]
        if c is None:
            return "router: joint classifier (none: no live contributor)"
        return f"classifier v{c['version']} ({c['trained']}, loss {c['final_loss']:.4f})"

    def audit(self, store, entry) -> dict:
        live = (store.manifest["classifier"] or {}).get("weights_hash")
        return {"classifier_before" if entry is not None else "classifier_after": live}

    def orphans(self, store) -> list[str]:
        """Versions the manifest does not name (a crash between a new version's switch
        and the old one's deletion): they may have seen forgotten data."""
        named = (store.manifest.get("classifier") or {}).get("path")
        folder = store.root / "classifier"
        deleted = []
        if folder.is_dir():
            for child in sorted(folder.iterdir()):
                if f"classifier/{child.name}" != named:
                    shutil.rmtree(child, ignore_errors=True)
                    deleted.append(f"classifier/{child.name}")
        return deleted

    def fingerprint(self, store, coalition) -> dict:
        c = store.manifest["classifier"]
        return {"hashes": {"classifier": c["weights_hash"]},
                "depends_on": sorted(set(c.get("contributor_ids") or store.contributor_ids)
                                     | set(coalition))}

    def load(self, store) -> ShardClassifier:
        if store.manifest.get("classifier") is None:
            raise StoreError(f"store {store.root} has no joint classifier (no live contributor)")
        return ShardClassifier.from_pretrained(store.root / store.manifest["classifier"]["path"], **LOAD).eval()
