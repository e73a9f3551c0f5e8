"""The `cdm` subcommands of the data and the store: demo-data, train, add, sample
(cli.py builds their options; commands.py has the service's: keys, forget, jobs,
payout, serve, value). Heavy imports happen inside each command, so `cdm --help` is
quick."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def split_csv(value: str) -> list[str]:
    """A comma-separated option as a list: "a, b,,c" -> ["a", "b", "c"]."""
    return [v.strip() for v in value.split(",") if v.strip()]


def cli_principal():
    """Who a `cdm` command acts as on the platform: the local user, an admin."""
    import getpass

    from .auth import Principal

    return Principal(f"cli:{getpass.getuser()}", "admin", None)


def cmd_demo_data(args) -> None:
    from shards.demo import write_demo_data

    out = Path(args.dir)
    if args.dataset == "studios":
        return _studios_data(args, out)
    if any(v is not None for v in (args.studios, args.labels, args.per_label, args.packages)):
        raise ValueError("--studios, --labels, --per-label and --packages are for "
                         "--dataset studios")
    table = write_demo_data(out, seed=args.seed, contributors=args.contributors)
    for cid, entry in table["contributors"].items():
        note = "  (corrupted: planted low quality)" if entry["corrupted"] else ""
        print(f"{cid:10s} {entry['images']:4d} images  digits {entry['classes']}{note}")
    print(f"public: {table['public_images']} images; held out: "
          f"{sum(table['heldout_images'].values())} images (owned by nobody)")
    print(f"wrote {out}/contributors/<id>/*.png, {out}/public, {out}/heldout, {out}/owners.json")


def _studios_data(args, out: Path) -> None:
    from shards.studios import write_studios

    if args.contributors is not None:
        raise ValueError("--contributors is for --dataset digits")
    labels = None if args.labels is None else split_csv(args.labels)
    if labels is not None:
        try:
            labels = [int(x) for x in labels]
        except ValueError:
            raise ValueError(f"--labels {args.labels!r}: comma-separated integers") from None
    studios = None if args.studios is None else split_csv(args.studios)
    table = write_studios(out, seed=args.seed, size=args.size, studios=studios, labels=labels,
                          per_label=args.per_label, packages=args.packages)
    for cid, entry in table["contributors"].items():
        note = f"  (planted: degraded copies of {entry['copies']})" if entry["planted"] else ""
        print(f"{cid:14s} {entry['images']:5d} images  {entry['licence']:13s}{note}")
    print(f"public: {table['public_images']} images; held out: {table['heldout_images']} "
          f"images (owned by nobody); {args.size}x{args.size} RGB, labels = categories")
    print(f"wrote {out}/contributors/<studio>/<label>/*.png (+ captions.csv, licence.json), "
          f"{out}/public, {out}/heldout, {out}/concepts.csv, {out}/owners.json")


def _store_config(args, image_shape: tuple[int, int, int] | None = None,
                  public: bool = False):
    """The store's settings: those chosen for images of `image_shape`
    (shards/config.py `defaults_for`), then the options given."""
    from shards import StoreConfig
    from shards.config import defaults_for

    if args.equal_steps and args.steps_per_images is not None:
        raise ValueError("--equal-steps and --steps-per-images exclude each other")
    config = StoreConfig(seed=args.seed, kind=args.kind, router=args.router,
                         keep_data=True if args.keep_data else None)
    if image_shape is not None:
        config = config.replace(**defaults_for(image_shape, public))
    changes = {}
    if args.shard_steps is not None:
        n = args.shard_steps
        changes.update(shard_train=config.shard_train.with_steps(n).to_dict(),
                       base_train=config.base_train.with_steps(n).to_dict(),
                       lora_train=config.lora_train.with_steps(n).to_dict())
    if args.equal_steps:
        changes["steps_reference_images"] = None
    elif args.steps_per_images is not None:
        changes["steps_reference_images"] = args.steps_per_images
    if args.classifier_steps is not None:
        n = args.classifier_steps
        changes.update(classifier_train=config.classifier_train.with_steps(n).to_dict(),
                       classifier_update_steps=max(1, n // 3))
    if args.shard_init is not None:
        changes["shard_init"] = args.shard_init
    if args.head_trunk is not None:
        changes["head_trunk"] = args.head_trunk
        if args.head_trunk == 0:  # heads on the pooled pixels: their measured width
            changes["head_hidden"] = StoreConfig().head_hidden
    if args.head_steps is not None:
        changes["head_train"] = config.head_train.with_steps(args.head_steps).to_dict()
    config = config.replace(**changes)
    if args.precision is not None:  # the denoisers' training (shards, base, LoRA)
        config = config.replace(**{part: dataclasses.replace(
            getattr(config, part), precision=args.precision).to_dict()
            for part in ("shard_train", "base_train", "lora_train")})
    return config


def cmd_train(args) -> None:
    from dataclasses import replace as drop

    from shards import ShardStore, load_contributors
    from shards.data import load_contributor

    _store_config(args)  # options first: their errors come before any data is read
    if args.base:
        from shards.pipeline import check_pipeline

        if args.no_text:
            raise ValueError("--base builds a text-conditional store (Stable Diffusion reads "
                             "prompts); drop --no-text")
        check_pipeline(args.base)
    datasets = load_contributors(args.data_dir)
    config = _store_config(args, datasets[0].image_shape, public=bool(args.public))
    if args.base:  # LoRA adapters on the pipeline's UNet: nothing of the pixel defaults
        config = _store_config(args).replace(kind="lora")
    pub = load_contributor(args.public, "public") if args.public else None
    public, public_labels = (pub.images, pub.labels) if pub else (None, None)
    # every contributor captioned: a text-conditional store, unless --no-text
    text = not args.no_text and all(d.captions is not None for d in datasets)
    if text and args.base:
        print("text-conditional store on the pipeline's text encoder: every contributor has "
              "captions")
    elif text:
        print(f"text-conditional store: every contributor has captions (--no-text for "
              f"{'labels' if datasets[0].labels is not None else 'none'})")
    if args.no_labels:  # the unconditional store of earlier versions, from labelled data
        datasets = [drop(d, labels=None) for d in datasets]
        public_labels = None
    store = ShardStore.create(args.store, datasets, config, public=public,
                              device=args.device, public_labels=public_labels,
                              workers=args.workers, text=text,
                              public_captions=list(pub.captions) if pub and pub.captions else None,
                              pipeline=args.base)
    _print_store(store)


def cmd_add(args) -> None:
    """As the service adds: recovery of what a crash interrupted first, then an add job
    (checked now, run here), audited like an API add."""
    from shards.errors import StoreError

    from .platform import Platform

    platform = Platform(args.store, device=args.device, serve=False)
    platform.run_jobs()
    job = platform.add_contributor(cli_principal(), args.folder, args.kind, anywhere=True)
    platform.run_jobs()
    done = platform.db.get_job(job["job_id"])
    if done["status"] != "succeeded":
        raise StoreError(f"add job {job['job_id']} {done['status']}: {done['error']}")
    store = platform.store
    entry = store.contributor(job["contributor_id"])
    print(f"added {job['contributor_id']} ({entry['kind']}, {entry['images']} images, "
          f"final loss {entry['final_loss']:.4f}); router {store.config.router} updated")
    _print_store(store)


def _print_store(store) -> None:
    print(f"store {store.root}: {len(store.contributor_ids)} contributors")
    for cid in store.contributor_ids:
        e = store.contributor(cid)
        labels = ",".join(sorted(e.get("labels", {}), key=int))
        print(f"  {cid:10s} {e['kind']:4s} {e['images']:5d} images  loss {e['final_loss']:.4f}  "
              f"data {e['data_hash'][:12]}" + (f"  trained in {e['precision']}" if "precision" in e else "")
              + (f"  labels {labels}" if labels else ""))
    if store.text:
        print(f"  text-conditional: prompts through {store.text['name']} "
              f"(at most {store.text['max_tokens']} tokens)")
    if store.pipeline:
        p = store.pipeline
        print(f"  pretrained latent base {p['source']}: {'x'.join(map(str, store.pixel_shape))} "
              f"images as {'x'.join(map(str, store.image_shape))} latents (copied to "
              f"{store.root / p['path']})")
    print(f"  {store.router.describe(store)}")


def cmd_sample(args) -> None:
    from shards import ShardStore
    from shards.images import save_grid

    path = Path(args.out)
    if path.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz, got {path.name!r}")
    from shards.routing import Routing

    routing = Routing.parse(args.routing, args.top_k, args.mass, args.mode, args.draw_above)
    store = ShardStore.open(args.store)
    sampler = store.load_sampler(args.device, cache_shards=args.cache_shards, router=args.router)
    contributors = split_csv(args.contributors) if args.contributors else None
    from shards.data import parse_label
    from shards.sampler import SampleRequest

    labels = tuple(parse_label(y, "--label") for y in split_csv(args.label)) if args.label else None
    request = SampleRequest(None if contributors is None else tuple(contributors), args.n,
                            args.seed, labels, prompt=args.prompt, guidance=args.guidance)
    out = sampler.sample_batch([request], steps=args.steps, scheduler=args.scheduler,
                               mode=args.mode, progress=True, routing=routing)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        import numpy as np

        extra = {} if out.labels is None else {"labels": out.labels.numpy()}
        np.savez(path, images=out.images.numpy(), contributor_ids=np.array(out.contributor_ids),
                 attribution_mean=out.attribution_mean.numpy(),
                 attribution_last=out.attribution_last.numpy(), **extra)
    else:
        save_grid(out.images, path)
    rows = sampler.shard_rows / (args.n * args.steps)
    print(f"wrote {path} ({args.n} samples, {args.scheduler}, {args.steps} steps, {args.mode}, "
          f"routing {routing.kind}: {rows:.2f} shard evaluations per sample and step)")
    print(f"{'contributor':12s} {'mean attribution':>17s} {'last-step':>10s}")
    for cid, row in out.attribution_table().items():
        print(f"{cid:12s} {row['mean']:17.3f} {row['last']:10.3f}")
