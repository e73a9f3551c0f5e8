"""`cdm`: the command line. Each subcommand parses arguments, calls the library, and
prints; domain errors (`CDMError`) become one-line messages and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def cmd_demo_data(args) -> None:
    from shards.demo import write_demo_data

    out = Path(args.dir)
    table = write_demo_data(out, seed=args.seed, contributors=args.contributors)
    for cid, entry in table["contributors"].items():
        note = "  (corrupted: planted low quality)" if entry["corrupted"] else ""
        print(f"{cid:10s} {entry['images']:4d} images  digits {entry['classes']}{note}")
    print(f"public: {table['public_images']} images; held out: "
          f"{sum(table['heldout_images'].values())} images (owned by nobody)")
    print(f"wrote {out}/contributors/<id>/*.png, {out}/public, {out}/heldout, {out}/owners.json")


def _store_config(args):
    from dataclasses import replace

    from shards import StoreConfig

    config = StoreConfig(seed=args.seed, kind=args.kind, router=args.router,
                         keep_data=True if args.keep_data else None)
    if args.shard_steps is not None:
        n = args.shard_steps
        config = replace(config, shard_train=config.shard_train.with_steps(n),
                         base_train=config.base_train.with_steps(n),
                         lora_train=config.lora_train.with_steps(n))
    if args.equal_steps and args.steps_per_images is not None:
        raise ValueError("--equal-steps and --steps-per-images exclude each other")
    if args.equal_steps:
        config = replace(config, steps_reference_images=None)
    elif args.steps_per_images is not None:
        config = replace(config, steps_reference_images=args.steps_per_images)
    if args.classifier_steps is not None:
        n = args.classifier_steps
        config = replace(config, classifier_train=config.classifier_train.with_steps(n),
                         classifier_update_steps=max(1, n // 3))
    if args.head_steps is not None:
        config = replace(config, head_train=config.head_train.with_steps(args.head_steps))
    return config


def cmd_train(args) -> None:
    from dataclasses import replace as drop

    from shards import ShardStore, load_contributors
    from shards.data import load_labelled_folder

    config = _store_config(args)  # options first: their errors come before any data is read
    datasets = load_contributors(args.data_dir)
    public, public_labels = load_labelled_folder(args.public) if args.public else (None, None)
    if args.no_labels:  # the unconditional store of earlier versions, from labelled data
        datasets = [drop(d, labels=None) for d in datasets]
        public_labels = None
    store = ShardStore.create(args.store, datasets, config, public=public,
                              device=args.device, public_labels=public_labels)
    _print_store(store)


def cmd_add(args) -> None:
    from shards import ShardStore, load_contributor

    store = ShardStore.open(args.store)
    entry = store.add(load_contributor(args.folder), kind=args.kind, device=args.device)
    router = "its head trained" if entry.get("head") else "classifier updated"
    print(f"added {entry['contributor_id']} ({entry['kind']}, {entry['images']} images, "
          f"final loss {entry['final_loss']:.4f}); {router}")
    _print_store(store)


def _print_store(store) -> None:
    print(f"store {store.root}: {len(store.contributor_ids)} contributors")
    for cid in store.contributor_ids:
        e = store.contributor(cid)
        labels = ",".join(sorted(e.get("labels", {}), key=int))
        print(f"  {cid:10s} {e['kind']:4s} {e['images']:5d} images  loss {e['final_loss']:.4f}  "
              f"data {e['data_hash'][:12]}" + (f"  labels {labels}" if labels else ""))
    c = store.manifest["classifier"]
    if c is not None:
        print(f"  classifier v{c['version']} ({c['trained']}, loss {c['final_loss']:.4f})")
    else:
        print(f"  router: one density-ratio head per contributor; data kept: {store.config.keeps_data}")


def cmd_sample(args) -> None:
    from shards import ShardStore
    from shards.images import save_grid

    path = Path(args.out)
    if path.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz, got {path.name!r}")
    from shards.routing import Routing

    routing = Routing.parse(args.routing, args.top_k, args.mass, args.mode)
    store = ShardStore.open(args.store)
    sampler = store.load_sampler(args.device, cache_shards=args.cache_shards, router=args.router)
    contributors = _csv(args.contributors) if args.contributors else None
    from shards.data import parse_label
    from shards.sampler import SampleRequest

    labels = tuple(parse_label(y, "--label") for y in _csv(args.label)) if args.label else None
    request = SampleRequest(None if contributors is None else tuple(contributors), args.n,
                            args.seed, labels)
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


def cmd_keys(args) -> None:
    import time

    from shards import ShardStore

    from .auth import create_key
    from .db import Database

    store = ShardStore.open(args.store)
    db = Database(store.root / "service.db")
    if args.keys_command == "demo":
        live = store.contributor_ids
        subset = live[: max(1, len(live) // 2)]
        admin = create_key(db, "demo-admin", None, role="admin")
        user = create_key(db, "demo-user", subset)
        print(f"demo admin key (all contributors, admin):  {admin}")
        print(f"demo user key (licensed for {','.join(subset)}): {user}")
        return
    if args.keys_command == "list":
        print(f"{'key id':14s} {'user':16s} {'role':11s} {'status':8s} {'expires':20s} licence")
        now = time.time()
        for k in db.list_keys():
            status = ("revoked" if k["revoked_at"] else
                      "expired" if k["expires_at"] and k["expires_at"] <= now else "active")
            expires = (time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["expires_at"]))
                       if k["expires_at"] else "never")
            licence = (f"acts for {k['contributor_id']}" if k["contributor_id"] else
                       "all" if k["license"] is None else ",".join(k["license"]) or "-")
            print(f"{k['key_id']:14s} {k['user'][:16]:16s} {k['role']:11s} {status:8s} "
                  f"{expires:20s} {licence}")
        return
    if args.keys_command == "revoke":
        if not db.revoke_key(args.key_id):
            raise ValueError(f"no active key with id {args.key_id!r} (see cdm keys list)")
        print(f"revoked {args.key_id}: refused from the next request, in every worker")
        return
    role = "admin" if args.admin else "contributor" if args.contributor else "user"
    if args.contributor:
        if args.license is not None:
            raise ValueError("--contributor keys act for one contributor and generate with "
                             "none: drop --license")
        store.contributor(args.contributor)  # must be live
        license = []
    elif args.license is None:
        raise ValueError("--license is required (comma-separated ids, or 'all')")
    else:
        license = None if args.license == "all" else _csv(args.license)
    if license:
        unknown = sorted(set(license) - set(store.contributor_ids))
        if unknown:
            raise ValueError(f"--license names contributors not in the store: {', '.join(unknown)}")
    key = create_key(db, args.user, license, role=role, expires_days=args.expires,
                     contributor_id=args.contributor)
    print(key)
    print("(shown once: only its hash is stored)", file=sys.stderr)


def _cli_principal():
    import getpass

    from .auth import Principal

    return Principal(f"cli:{getpass.getuser()}", "admin", None)


def cmd_forget(args) -> None:
    from shards.errors import StoreError

    from .platform import Platform

    platform = Platform(args.store, device=args.device, serve=False)
    job = platform.forget(_cli_principal(), args.contributor_id)
    print(f"excluded {args.contributor_id} (no request from now on uses it); purging ...")
    platform.run_jobs()
    done = platform.db.get_job(job["job_id"])
    if done["status"] != "succeeded":
        raise StoreError(f"purge job {job['job_id']} {done['status']}: {done['error']}")
    result = done["result"]
    print(f"forgot {args.contributor_id}: deleted {', '.join(result['deleted'])}; retrained "
          f"{result['retrained']}; valuation entries dropped: {result['valuation_caches_dropped']}")
    print(f"audit: data {result['data_hash'][:12]}, weights {result['weights_hash'][:12]} "
          f"(job {job['job_id']})")


def cmd_jobs(args) -> None:
    from .platform import Platform

    platform = Platform(args.store, device=args.device, serve=False)
    if args.run:
        ran = platform.run_jobs()
        print(f"ran {ran} job(s) (queued, and any a crash interrupted)")
    for job in platform.db.jobs()[-args.last:]:
        cid = job["params"].get("contributor_id", "*")
        print(f"{job['job_id']}  {job['kind']:6s} {cid:12s} {job['status']:10s} "
              f"{job['error'] or ''}")


def cmd_payout(args) -> None:
    from .platform import Platform, describe_policy

    platform = Platform(args.store, serve=False)
    if args.property or args.method:
        if not (args.property and args.method):
            raise ValueError("give both --property and --method (or neither, to show)")
        out = platform.set_payout_policy(_cli_principal(), args.property, args.method,
                                         args.alpha, args.beta)
    else:
        platform.store.refresh()
        out = platform._payout(set(platform.store.contributor_ids))
    policy = out["policy"]
    print("policy: " + (describe_policy(policy) if policy else "none"))
    for cid, share in (out["shares"] or {}).items():
        print(f"  {cid:12s} {share:8.4f}")
    print(out["note"])


def cmd_serve(args) -> None:
    from shards import ShardStore

    ShardStore.open(args.store)  # fail here, with a clear message, not inside bentoml
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers}; allowed: an integer >= 1")
    env = {**os.environ, "CDM_STORE": str(Path(args.store).resolve()),
           "CDM_WORKERS": str(args.workers)}
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml), "serve", "service.app:CDMService", "--host", args.host,
           "--port", str(args.port), "--working-dir", str(Path(__file__).resolve().parent.parent)]
    os.execve(cmd[0], cmd, env)


def cmd_value(args) -> None:
    from valuation.run import ValuationSettings, run_valuation

    from .db import Database
    from .platform import record_primary

    aesthetic = None
    if args.property == "aesthetic":
        aesthetic = {"arch": args.clip_arch, "checkpoint": args.clip_checkpoint,
                     "head": args.aesthetic_head}
    settings = ValuationSettings(
        property=args.property, methods=tuple(_csv(args.methods)), n=args.n, steps=args.steps,
        seed=args.seed, workers=args.workers, max_evaluations=args.max_evaluations,
        stderr_tol=args.stderr_tol, pruning_ratio=args.pruning_ratio,
        monolith_steps=args.monolith_steps, finetune_steps=args.finetune_steps,
        subset_steps=args.subset_steps, retrain_steps=args.retrain_steps, aesthetic=aesthetic,
        ray_address=args.ray, alpha=args.alpha, beta=args.beta,
        rank_patience=args.rank_patience)
    from shards import ShardStore

    store = ShardStore.open(args.store)
    # the admin lock: no forget's purge runs meanwhile (it would race the utility cache);
    # exclusions still take effect at once, and a forgotten player voids the run
    with store.admin_lock():
        players = set(store.contributor_ids)
        report, results = run_valuation(args.store, settings, heldout=args.heldout,
                                        report_dir=args.report)
        store.refresh()
        gone = sorted(players - set(store.contributor_ids))
        if gone:
            raise ValueError(f"contributor(s) {', '.join(gone)} were forgotten during the "
                             "valuation; nothing was recorded as credit; run it again")
        # recorded before the lock is released: no purge can run in between
        best = record_primary(Database(Path(args.store) / "service.db"), results)
    methods = list(results)
    print(f"{'contributor':12s}" + "".join(f"{m:>14s}" for m in methods))
    for c in report["players"]:
        print(f"{c:12s}" + "".join(f"{results[m][c]:14.4f}" for m in methods))
    print("seconds     " + "".join(f"{results[m].seconds:14.1f}" for m in methods))
    for pair, v in report["correlations"].items():
        print(f"{pair}: Pearson {v['pearson']:.3f}, Spearman {v['spearman']:.3f}")
    if best is not None:
        print(f"recorded the {best.method} values as the store's latest {args.property} credit")
    if args.report:
        print(f"report: {args.report}/report.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description="Compartmentalized diffusion: "
                                     "one shard per contributor, composed at sampling time.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the embedded default data (sklearn digits)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contributors", type=int, default=None, metavar="N",
                   help="split the digits among N contributors (one to three digits each, "
                        "one planted low-quality); default: the 7 of the default store")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("train", help="train a new store: one shard per DATA_DIR/<id>/")
    p.add_argument("data_dir")
    p.add_argument("--store", required=True)
    p.add_argument("--kind", choices=["full", "lora"], default="full")
    p.add_argument("--public", help="public images (no contributor owns them): the reference "
                   "of router 'heads' and the base of LoRA shards")
    p.add_argument("--router", choices=["heads", "joint"], default="heads",
                   help="heads: one density-ratio head per contributor (forget and add touch "
                        "no one else); joint: one classifier on everyone's data")
    p.add_argument("--keep-data", action="store_true",
                   help="keep a copy of each contributor's images in the store (always with "
                        "--router joint; needed by the pruned/retrain valuation methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-steps", type=int, default=None,
                   help="training steps per shard (and for the LoRA base); default 800")
    p.add_argument("--steps-per-images", type=int, default=None, metavar="R",
                   help="a shard of R images trains --shard-steps, any other in proportion "
                        "to its images (at least 200 steps); default 154")
    p.add_argument("--equal-steps", action="store_true",
                   help="every shard trains --shard-steps, whatever its size")
    p.add_argument("--classifier-steps", type=int, default=None,
                   help="training steps of the joint classifier; default 800")
    p.add_argument("--head-steps", type=int, default=None,
                   help="training steps of each density-ratio head; default 4000")
    p.add_argument("--no-labels", action="store_true",
                   help="ignore the data's labels: an unconditional store (labelled data "
                        "otherwise makes class-conditional shards and router)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("add", help="add one contributor folder to an existing store")
    p.add_argument("folder")
    p.add_argument("--store", required=True)
    p.add_argument("--kind", choices=["full", "lora"], default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("sample", help="sample from the composition of some contributors")
    p.add_argument("--store", required=True)
    p.add_argument("--contributors", default=None, help="comma-separated ids (default: all)")
    p.add_argument("--label", default=None,
                   help="labelled stores: the label of every sample, or one per sample "
                        "(comma-separated); default: drawn from the composition's labels")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--mode", choices=["composed", "naive"], default="composed")
    p.add_argument("--routing", choices=["dense", "topk"], default=None,
                   help="dense: every sample on every shard of S; topk (default): each "
                        "sample on its top shards only")
    p.add_argument("--top-k", type=int, default=None,
                   help="topk: at most this many shards per sample (the default routing: "
                        "3 with --mass 0.9; giving --top-k and/or --mass sets just those)")
    p.add_argument("--mass", type=float, default=None,
                   help="topk: the fewest shards holding this much weight, in (0, 1]")
    p.add_argument("--cache-shards", type=int, default=None,
                   help="shards resident at once (default: $CDM_SHARD_CACHE, else 1024)")
    p.add_argument("--router", choices=["heads", "joint"], default=None,
                   help="check that the store has this router (it is fixed at train time)")
    p.add_argument("--out", required=True, help=".png (grid) or .npz")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("keys", help="create, list and revoke API keys (stored hashed)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="a key for one user (printed once)")
    k.add_argument("--store", required=True)
    k.add_argument("--user", required=True)
    k.add_argument("--license", default=None, help="comma-separated contributor ids, or 'all'")
    k.add_argument("--admin", action="store_true")
    k.add_argument("--contributor", default=None, metavar="ID",
                   help="a contributor key: sees its own credit and history, may forget itself")
    k.add_argument("--expires", type=float, default=None, metavar="DAYS",
                   help="refused after this many days (default: never)")
    k = keys.add_parser("list", help="every key: id, user, role, status, expiry, licence")
    k.add_argument("--store", required=True)
    k = keys.add_parser("revoke", help="refuse a key from the next request on")
    k.add_argument("key_id")
    k.add_argument("--store", required=True)
    k = keys.add_parser("demo", help="a demo admin key and a demo user key for half the store")
    k.add_argument("--store", required=True)
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("forget", help="forget a contributor now: exclude, delete everything "
                       "derived from it, write the audit record")
    p.add_argument("contributor_id")
    p.add_argument("--store", required=True)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("jobs", help="list admin jobs; --run runs queued and interrupted ones")
    p.add_argument("--store", required=True)
    p.add_argument("--run", action="store_true",
                   help="run queued jobs and recover those a crash interrupted, then list")
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("value", help="Shapley values of the contributors for a property")
    p.add_argument("--store", required=True)
    p.add_argument("--property", default="precision",
                   choices=["quality", "diversity", "confidence", "precision", "recall",
                            "aesthetic"],
                   help="default precision: what the default payout policy pays by")
    p.add_argument("--methods", default="exact,beta-shapley,loo,attribution",
                   help="comma-separated: exact, permutation, kernelshap (Shapley); banzhaf, "
                        "banzhaf-msr, beta-shapley (other semivalues); pruned, retrain; loo, "
                        "attribution")
    p.add_argument("--alpha", type=float, default=16.0,
                   help="beta-shapley: Beta(alpha, beta) over coalition sizes (> 0)")
    p.add_argument("--beta", type=float, default=1.0, help="beta-shapley (> 0)")
    p.add_argument("--rank-patience", type=int, default=0, metavar="M",
                   help="sampled methods: stop once the ranking held for M updates (0: off)")
    p.add_argument("--heldout", default=None,
                   help="held-out digits (heldout/<digit>/*.png) to build the store's evaluator")
    p.add_argument("--report", default=None, help="folder for report.md/.json and plots")
    p.add_argument("--n", type=int, default=256, help="samples per coalition")
    p.add_argument("--steps", type=int, default=25, help="sampling steps per coalition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes for coalition evaluations (local, or Ray actors); "
                        "default: the CPU count, at most 4")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="fan out over a Ray cluster at ADDRESS ('local': start Ray here); "
                        "needs pip install '.[ray]'")
    p.add_argument("--max-evaluations", type=int, default=400,
                   help="coalition budget of the sampled estimators")
    p.add_argument("--stderr-tol", type=float, default=0.0,
                   help="stop sampled estimators once every stderr is below this")
    p.add_argument("--pruning-ratio", type=float, default=0.3)
    p.add_argument("--monolith-steps", type=int, default=2400)
    p.add_argument("--finetune-steps", type=int, default=800)
    p.add_argument("--subset-steps", type=int, default=100,
                   help="pruned fine-tune: steps on D_S per coalition")
    p.add_argument("--retrain-steps", type=int, default=800)
    p.add_argument("--clip-arch", default=None, help="aesthetic: open_clip model name")
    p.add_argument("--clip-checkpoint", default=None, help="aesthetic: local checkpoint file")
    p.add_argument("--aesthetic-head", default=None, help="aesthetic: local safetensors head")
    p.set_defaults(func=cmd_value)

    p = sub.add_parser("payout", help="show or set the payout policy (which recorded "
                       "valuation credit's payout_share follows)")
    p.add_argument("--store", required=True)
    p.add_argument("--property", default=None)
    p.add_argument("--method", default=None)
    p.add_argument("--alpha", type=float, default=None, help="beta-shapley: default 16")
    p.add_argument("--beta", type=float, default=None, help="beta-shapley: default 1")
    p.set_defaults(func=cmd_payout)

    p = sub.add_parser("serve", help="serve a store over HTTP (BentoML)")
    p.add_argument("--store", default=os.environ.get("CDM_STORE", "var/store"))
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=int(os.environ.get("CDM_WORKERS", "1")),
                   help="worker processes; each checks the store before every request")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shards.errors import CDMError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CDMError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
