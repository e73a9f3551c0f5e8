"""A router compartmentalized like the shards: one density-ratio head per contributor.

Head i is trained only on contributor i's data D_i and on a reference data set owned
by nobody (the public split), both forward-noised. Logistic regression of noised D_i
(label 1) against noised reference images (label 0), in balanced batches and with
t drawn the same way for both classes, has the optimum

    (5) r_i(x_t, t) = log p_t^i(x_t) / p_t^ref(x_t)

so for any subset S, with priors lambda_i (docs/maths.md eq. 1):

    (6) softmax_{i in S}( r_i + log lambda_i ) = lambda_i p_t^i / sum_{j in S} lambda_j p_t^j

the reference density cancels. Forgetting c deletes head c; adding c trains head c;
no head ever sees another contributor's data. Where the reference has little mass
the ratios are poorly estimated (docs/evidence.md compares this router with the joint
one).

Labelled stores condition every head on the label y: its own images of label y
against reference images of the same label y, so the optimum is

    (5') r_i(x_t, t, y) = log p_t^i(x_t | y) / p_t^ref(x_t | y)

and softmax_{i in S}( r_i + log lambda_i(y) ) with lambda_i(y) proportional to i's
images of label y is the posterior over the shards of S that hold y (the reference
density of label y cancels). A head only ever sees labels its contributor holds; the
sampler gives every other contributor weight 0 for that label.

Text-conditional stores condition every head on the caption's pooled embedding c
(text.py), trained jointly: noised pairs (x_0, c) of D_i against noised pairs of the
reference with their own captions, so the optimum is

    (5'') r_i(x_t, t, c) = log p_t^i(x_t, c) / p_t^ref(x_t, c)

and softmax_{i in S}( r_i + log lambda_i ) = lambda_i p_t^i(x_t, c) / sum_j lambda_j
p_t^j(x_t, c) = p(i | x_t, c), the posterior of the composition given the prompt, with
the global priors: how likely i is to hold prompts like c is part of the ratio
(docs/maths.md eq. 5''). Captions are replaced by the null text on both sides with
the shards' dropout rate, so r_i(x_t, t, null) learns the image-only ratio (5): a
request without a prompt is routed as the unconditional composition.

A head is a small time-conditioned MLP on the image (average-pooled to at most
16 x 16 pixels): h1 = silu(W1 x + T1 e(t) + L1[y] + b1), h2 = silu(W2 h1 + T2 e(t) +
L2[y] + b2), r = w3 . h2 + b3, with e(t) a fixed sinusoidal embedding and L1, L2
label embeddings (labelled stores only; P1 c and P2 c in their place in text stores). `StackedHeads` stacks the
live heads' weights and evaluates all of them in three batched matmuls. With a trunk
(`StoreConfig.head_trunk` F > 0), every head reads the pooled image's projection on F
principal directions of the public data instead of its pixels (trunk.py): the heads'
cost then barely grows with N.

`HeadsRouter` is this router as the store builds, adds and forgets it (router.py):
STORE/reference/ holds the public reference (owned by nobody, with its labels in a
labelled store) and the trunk fit on it, STORE/router/<id>/ contributor <id>'s head.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import DataError, StoreError
from .files import files_hash, read_verified, sweep, tensor_hash
from .models import LOAD, seeded
from .router import RouterUpdate
from .shard import derived_seed
from .text import Captions
from .training import TrainConfig, forward_noise, optimize
from .trunk import PublicTrunk, feature_dim, fit_for, head_width, pooled

__all__ = ["DensityRatioHead", "HeadsRouter", "StackedHeads", "feature_dim", "train_head"]

class DensityRatioHead(ModelMixin, ConfigMixin):
    """r_i(x_t, t) of one contributor (eq. 5); saved as config.json + safetensors."""

    @register_to_config
    def __init__(self, contributor_id: str = "a", in_features: int = 64, hidden: int = 64,
                 time_dim: int = 32, num_labels: int = 0, text_dim: int = 0):
        super().__init__()
        self.text1 = torch.nn.Linear(text_dim, hidden, bias=False) if text_dim else None
        self.text2 = torch.nn.Linear(text_dim, hidden, bias=False) if text_dim else None
        self.label1 = torch.nn.Embedding(num_labels, hidden) if num_labels else None
        self.label2 = torch.nn.Embedding(num_labels, hidden) if num_labels else None
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.lin1 = torch.nn.Linear(in_features, hidden)
        self.time1 = torch.nn.Linear(time_dim, hidden, bias=False)
        self.lin2 = torch.nn.Linear(hidden, hidden)
        self.time2 = torch.nn.Linear(time_dim, hidden, bias=False)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) log-ratio estimates (given labels `y` (B,) in a labelled store, the
        prompts' pooled embeddings `y` (B, D) in a text store)."""
        e = self.time_proj(torch.as_tensor(t).expand(x_t.shape[0])).to(x_t.dtype)
        h = self.lin1(pooled(x_t)) + self.time1(e)
        if self.label1 is not None:
            h = h + self.label1(_labels(y, x_t))
        if self.text1 is not None:
            h = h + self.text1(_text(y, x_t))
        h = F.silu(h)
        h = self.lin2(h) + self.time2(e)
        if self.label2 is not None:
            h = h + self.label2(_labels(y, x_t))
        if self.text2 is not None:
            h = h + self.text2(_text(y, x_t))
        return self.out(F.silu(h)).squeeze(-1)


def _labels(y: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor:
    if y is None:
        raise ValueError("this router is class-conditional: pass the labels y")
    return torch.as_tensor(y, device=x_t.device).expand(x_t.shape[0])


def _text(c: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor:
    if c is None or not torch.is_floating_point(c):
        raise ValueError("this router is text-conditional: pass the prompts' pooled embeddings")
    return c.to(x_t.dtype).expand(x_t.shape[0], -1)


class StackedHeads(torch.nn.Module):
    """Every live head at once: (x_t, t) -> (B, K) log ratios r_i (eq. 5)."""

    def __init__(self, heads: list[DensityRatioHead], trunk: PublicTrunk | None = None):
        super().__init__()
        if not heads:
            raise ValueError("StackedHeads needs at least one head")
        self.trunk = trunk
        self.contributor_ids = [h.config.contributor_id for h in heads]
        self.time_proj = heads[0].time_proj
        names = ["lin1.weight", "lin1.bias", "time1.weight", "lin2.weight", "lin2.bias",
                 "time2.weight", "out.weight", "out.bias"]
        self.labelled = heads[0].label1 is not None
        if any((h.label1 is not None) != self.labelled for h in heads):
            raise ValueError("heads of one router must all be labelled or all unlabelled")
        if self.labelled:
            names += ["label1.weight", "label2.weight"]
        self.text = heads[0].text1 is not None
        if any((h.text1 is not None) != self.text for h in heads):
            raise ValueError("heads of one router must all be text-conditional or none")
        if self.text:
            names += ["text1.weight", "text2.weight"]
        states = [h.state_dict() for h in heads]
        for name in names:
            self.register_buffer(name.replace(".", "_"), torch.stack([s[name] for s in states]))

    def log_ratios(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        e = self.time_proj(torch.as_tensor(t).expand(x_t.shape[0])).to(x_t.dtype)  # (B, E)
        x = pooled(x_t) if self.trunk is None else self.trunk(x_t)  # (B, D) or (B, F)
        # (K, B, H): every head on every sample, batched over heads
        h = torch.einsum("bd,khd->kbh", x, self.lin1_weight) + self.lin1_bias[:, None]
        h = h + torch.einsum("be,khe->kbh", e, self.time1_weight)
        if self.labelled:
            h = h + self.label1_weight[:, _labels(y, x_t)]
        if self.text:
            h = h + torch.einsum("bc,khc->kbh", _text(y, x_t), self.text1_weight)
        h = F.silu(h)
        h2 = torch.bmm(h, self.lin2_weight.transpose(1, 2)) + self.lin2_bias[:, None]
        h2 = h2 + torch.einsum("be,khe->kbh", e, self.time2_weight)
        if self.labelled:
            h2 = h2 + self.label2_weight[:, _labels(y, x_t)]
        if self.text:
            h2 = h2 + torch.einsum("bc,khc->kbh", _text(y, x_t), self.text2_weight)
        h2 = F.silu(h2)
        r = torch.bmm(h2, self.out_weight.transpose(1, 2)).squeeze(-1) + self.out_bias
        return r.transpose(0, 1)  # (B, K)

    def forward(self, x_t, t, y=None):
        return self.log_ratios(x_t, t, y)


def train_head(head: DensityRatioHead, images: torch.Tensor, reference: torch.Tensor,
               scheduler: DDPMScheduler, config: TrainConfig, seed: int, *,
               labels: torch.Tensor | None = None, reference_labels: torch.Tensor | None = None,
               captions=None, reference_captions=None, trunk: PublicTrunk | None = None,
               device: torch.device | str = "cpu", progress: bool = True) -> float:
    """Logistic regression of noised `images` (1) against noised `reference` (0), in
    balanced batches of `config.batch_size` each (eq. 5); with `labels`, each own
    image is paired with a reference image of the same label (eq. 5'); with
    `captions` (text.Captions of the images and of the reference), every image is
    seen with its caption's pooled embedding (eq. 5''); with a `trunk`, the head
    reads the trunk's features of the noised images. Returns the mean loss over the
    last 10% of steps.

    Raises:
        ValueError: shapes differ; labels on one side only; a label of `images` that
            the reference lacks.
    """
    if images.shape[1:] != reference.shape[1:]:
        raise ValueError(f"images {tuple(images.shape[1:])} and reference "
                         f"{tuple(reference.shape[1:])} differ in shape")
    if (labels is None) != (reference_labels is None) or (labels is None) != (head.label1 is None):
        raise ValueError("a labelled head needs labels for its images and its reference")
    if (captions is None) != (reference_captions is None) or (captions is None) != (head.text1 is None):
        raise ValueError("a text head needs captions for its images and its reference")
    width = head_width(tuple(images.shape[1:]), trunk)
    if head.config.in_features != width:
        raise ValueError(f"the head reads {head.config.in_features} features; its input "
                         f"gives {width}")
    if trunk is not None:
        trunk = trunk.to(device)
    generator = torch.Generator().manual_seed(seed)
    b = config.batch_size
    target = torch.cat([torch.ones(b), torch.zeros(b)]).to(device)
    if labels is not None:
        order = torch.argsort(reference_labels, stable=True)
        counts = torch.bincount(reference_labels, minlength=int(labels.max()) + 1)
        starts = torch.cumsum(counts, 0) - counts
        lacking = sorted(set(labels.tolist()) - set(reference_labels.tolist()))
        if lacking:
            raise ValueError(f"the reference (public) data has no image of label(s) {lacking}")

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(images), (b,), generator=generator)
        if captions is not None:
            ref_idx = torch.randint(0, len(reference), (b,), generator=generator)
            y = torch.cat([captions.pooled(idx, generator),
                           reference_captions.pooled(ref_idx, generator)]).to(device)
        elif labels is None:
            ref_idx, y = torch.randint(0, len(reference), (b,), generator=generator), None
        else:
            y = labels[idx]
            within = (torch.rand(b, generator=generator) * counts[y]).long()
            ref_idx = order[starts[y] + within]
            y = torch.cat([y, y]).to(device)
        x_t, t, _ = forward_noise(scheduler, torch.cat([images[idx], reference[ref_idx]]), generator)
        x_t = x_t.to(device)
        if trunk is not None:
            x_t = trunk(x_t)
        return F.binary_cross_entropy_with_logits(head(x_t, t.to(device), y), target)

    return optimize(head, batch_loss, config, weight_decay=1e-4, device=device,
                    desc=f"head {head.config.contributor_id}", progress=progress)


class HeadsRouter:
    """Router `heads` (router.py): a head per contributor; what they share (the public
    reference, the trunk) is owned by nobody."""

    kind = "heads"
    public_use = "router 'heads' (its reference)"
    retrains = "nothing"

    def setup(self, root, manifest, public, public_labels, public_captions=None) -> None:
        (root / "reference").mkdir()
        kept = {"images": public.contiguous()}
        if public_labels is not None:
            kept["labels"] = public_labels.contiguous()
        extra = {} if public_captions is None else {"captions": json.dumps(list(public_captions))}
        save_file(kept, str(root / "reference" / "images.safetensors"), metadata=extra or None)
        manifest["reference"] = {"path": "reference", "images": len(public),
                                 "data_hash": tensor_hash(public, public_labels, public_captions)}
        trunk = fit_for(public, manifest["config"].get("head_trunk", 0))
        if trunk is not None:
            (root / "reference" / "trunk").mkdir()
            trunk.save(root / "reference" / "trunk")
            manifest["reference"]["trunk"] = {"path": "reference/trunk", "features": trunk.features,
                                              "weights_hash": files_hash(root / "reference" / "trunk")}

    @staticmethod
    def trunk(store) -> PublicTrunk | None:
        """The trunk every head reads (None: heads read the pooled pixels).

        Raises:
            StoreError: its file is missing or not the one the manifest records.
        """
        info = store.manifest["reference"].get("trunk")
        if not info:
            return None
        files = read_verified(store.root / info["path"], info["weights_hash"])
        if PublicTrunk.FILE not in files:
            raise StoreError(f"{store.root / info['path']}: the router's trunk is missing or "
                             "not the one the manifest records")
        return PublicTrunk.from_bytes(files[PublicTrunk.FILE])

    @staticmethod
    def reference(store) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The public reference: images and labels (None: unlabelled)."""
        kept = load_file(store.root / store.manifest["reference"]["path"] / "images.safetensors")
        return kept["images"], kept.get("labels")

    @staticmethod
    def reference_captions(store) -> list[str] | None:
        """The public reference's captions (a text store), else None."""
        path = store.root / store.manifest["reference"]["path"] / "images.safetensors"
        with safe_open(str(path), "pt") as f:
            captions = (f.metadata() or {}).get("captions")
        return None if captions is None else json.loads(captions)

    def check_state(self, store) -> None:
        pass

    def check_data(self, store, data) -> None:
        if not store.num_labels:
            return
        lacking = sorted(set(data.label_counts()) - {int(y) for y in self.reference(store)[1].unique()})
        if lacking:
            raise DataError(f"contributor {data.contributor_id!r} has label(s) {lacking}, of "
                            "which the store's public reference holds no image")

    def contributor_part(self, store, data, scheduler, device, progress) -> dict:
        """Train router/<id> on D_id against the reference (eq. 5), staged and renamed."""
        cid, config = data.contributor_id, store.config
        seed = derived_seed(config.seed, "head", cid)
        trunk = self.trunk(store)
        with seeded(seed):
            head = DensityRatioHead(contributor_id=cid,
                                    in_features=head_width(store.image_shape, trunk),
                                    hidden=config.head_hidden, num_labels=store.num_labels,
                                    text_dim=store.text_dim)
        reference, reference_labels = self.reference(store)
        captions = reference_captions = None
        if store.text:
            encoder = store.text_encoder()
            captions = Captions(data.captions, encoder)  # the null text too, as the shards
            reference_captions = Captions(self.reference_captions(store), encoder)
        loss = train_head(head, data.images, reference, scheduler, config.head_train, seed,
                          labels=None if store.text else data.labels,
                          reference_labels=reference_labels, captions=captions,
                          reference_captions=reference_captions, trunk=trunk, device=device,
                          progress=progress)
        staging, final = store.root / "router" / f".{cid}.partial", store.root / "router" / cid
        head.cpu().save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return {"head": {"path": f"router/{cid}", "weights_hash": files_hash(final), "seed": seed,
                         "steps": config.head_train.steps, "final_loss": loss}}

    def train(self, store, device, progress) -> RouterUpdate:
        return RouterUpdate()

    def extend(self, store, data, device, progress) -> RouterUpdate:
        return RouterUpdate()

    def derived_paths(self, contributor_id: str, entry: dict) -> list[str]:
        head = (entry.get("head") or {}).get("path")
        return [head] if head else []

    def staging_paths(self, contributor_id: str) -> list[str]:
        return [f"router/.{contributor_id}.partial"]

    def describe(self, store) -> str:
        trunk = store.manifest["reference"].get("trunk")
        reads = (f"reading {trunk['features']} public principal directions" if trunk
                 else "reading the pooled pixels")
        return (f"router: one density-ratio head per contributor, {reads}; data kept: "
                f"{store.config.keeps_data}")

    def audit(self, store, entry) -> dict:
        if entry is None or not entry.get("head"):
            return {}
        return {"head_weights_hash": entry["head"]["weights_hash"]}

    def orphans(self, store) -> list[str]:
        known = set(store.manifest["contributors"]) | set(store.manifest["excluded"])
        return sweep(store.root, "router", known)

    def fingerprint(self, store, coalition) -> dict:
        trunk = store.manifest["reference"].get("trunk")
        return {"hashes": {"heads": {c: store.contributor(c)["head"]["weights_hash"]
                                     for c in sorted(coalition)},
                           **({"trunk": trunk["weights_hash"]} if trunk else {})},
                "depends_on": sorted(coalition)}

    def load(self, store) -> StackedHeads:
        return StackedHeads([DensityRatioHead.from_pretrained(store.root / store.contributor(c)["head"]["path"], **LOAD).eval()
                             for c in store.contributor_ids], trunk=self.trunk(store))
