"""What each `cdm` subcommand of the service does (keys, forget, jobs, payout, serve,
value; store_commands.py has those of the data and the store): parse nothing (cli.py
builds the options), call the service's logic, print. Heavy imports happen inside
each command, so `cdm --help` is quick."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .store_commands import cli_principal, split_csv


def cmd_keys(args) -> None:
    import time

    from shards import ShardStore

    from .auth import create_key
    from .db import open_database

    store = ShardStore.open(args.store)
    db = open_database(store.root)
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
        license = None if args.license == "all" else split_csv(args.license)
    if license:
        unknown = sorted(set(license) - set(store.contributor_ids))
        if unknown:
            raise ValueError(f"--license names contributors not in the store: {', '.join(unknown)}")
    key = create_key(db, args.user, license, role=role, expires_days=args.expires,
                     contributor_id=args.contributor)
    print(key)
    print("(shown once: only its hash is stored)", file=sys.stderr)


def cmd_forget(args) -> None:
    from shards.errors import StoreError

    from .platform import Platform

    platform = Platform(args.store, device=args.device, serve=False)
    job = platform.forget(cli_principal(), args.contributor_id)
    print(f"excluded {args.contributor_id} (no request from now on uses it); purging ...")
    platform.run_jobs("purge")
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
    from .credit import describe_policy
    from .platform import Platform

    platform = Platform(args.store, serve=False)
    if args.property or args.method:
        if not (args.property and args.method):
            raise ValueError("give both --property and --method (or neither, to show)")
        out = platform.set_payout_policy(cli_principal(), args.property, args.method,
                                         args.alpha, args.beta)
    else:
        out = platform.payout()
    policy = out["policy"]
    print("policy: " + (describe_policy(policy) if policy else "none"))
    for cid, share in (out["shares"] or {}).items():
        print(f"  {cid:12s} {share:8.4f}")
    print(out["note"])


def serve_home(port: int) -> Path:
    """BentoML's home for the `cdm serve` on `port` (~/.cache/cdm-serve/bentoml/<port>):
    BentoML keeps the workers' Prometheus files there and empties it when a server
    starts, so two servers sharing ~/bentoml would wipe each other's metrics."""
    from shards.settings import cache_dir

    home = cache_dir() / "bentoml" / str(port)
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def cmd_serve(args) -> None:
    from shards import ShardStore
    from shards.settings import check_int, env_int

    from .db import open_database

    # fail here, with one clear line, not inside bentoml's workers: the store, then the
    # database (CDM_DATABASE_URL: a wrong URL, unreachable, wrong credentials)
    ShardStore.open(args.store)
    open_database(args.store).close()
    workers = env_int("CDM_WORKERS") if args.workers is None else args.workers
    check_int("CDM_WORKERS", workers, "--workers")
    env = {**os.environ, "CDM_STORE": str(Path(args.store).resolve()),
           "CDM_WORKERS": str(workers)}
    if "BENTOML_HOME" not in env:  # see serve_home
        env["BENTOML_HOME"] = str(serve_home(args.port))
    bentoml = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml), "serve", "service.app:CDMService", "--host", args.host,
           "--port", str(args.port), "--working-dir", str(Path(__file__).resolve().parent.parent)]
    os.execve(cmd[0], cmd, env)


def cmd_value(args) -> None:
    from valuation.run import ValuationSettings, run_valuation

    from .credit import record_primary
    from .db import open_database

    aesthetic = None
    if args.property == "aesthetic":
        aesthetic = {"arch": args.clip_arch, "checkpoint": args.clip_checkpoint,
                     "head": args.aesthetic_head}
    settings = ValuationSettings(
        property=args.property, methods=tuple(split_csv(args.methods)), n=args.n, steps=args.steps,
        seed=args.seed, workers=args.workers, max_evaluations=args.max_evaluations,
        stderr_tol=args.stderr_tol, pruning_ratio=args.pruning_ratio,
        monolith_steps=args.monolith_steps, finetune_steps=args.finetune_steps,
        subset_steps=args.subset_steps, retrain_steps=args.retrain_steps, aesthetic=aesthetic,
        ray_address=args.ray, alpha=args.alpha, beta=args.beta,
        rank_patience=args.rank_patience)
    from shards import ShardStore

    store = ShardStore.open(args.store)
    # the work lock: one valuation or add at a time. A forget's purge runs beside it:
    # nothing is cached for a contributor once excluded (valuation/utility.py), and a
    # forgotten player voids the run
    with store.work_lock():
        players = set(store.contributor_ids)
        report, results = run_valuation(args.store, settings, heldout=args.heldout,
                                        report_dir=args.report)
        with store.write_lock():  # no exclusion between this check and the record
            gone = sorted(players - set(store.contributor_ids))
            if gone:
                raise ValueError(f"contributor(s) {', '.join(gone)} were forgotten during "
                                 "the valuation; nothing was recorded as credit; run it again")
            best = record_primary(open_database(args.store), results)
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
