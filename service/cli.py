"""`cdm`: the command line. Options, choices and defaults come from shards/settings.py
(and StoreConfig's defaults), so each is written once; each subcommand is a function of
store_commands.py (the data and the store) or commands.py (the service). Domain errors
(`CDMError`, `ValueError`) become one-line messages and exit status 2."""

from __future__ import annotations

import os

# Before anything else: importing any part of `shards` imports diffusers (and with it
# huggingface_hub, which reads these at import), so shards.settings.offline() would
# come too late here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")

import argparse  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from shards.config import StoreConfig  # noqa: E402
from shards.settings import (  # noqa: E402
    DEFAULT_MASS,
    DEFAULT_TOP_K,
    METHODS,
    MODES,
    PRECISIONS,
    PROPERTIES,
    ROUTERS,
    ROUTINGS,
    SAMPLE_STEPS,
    SCHEDULERS,
    SHARD_INITS,
    SHARD_KINDS,
    VALUATION,
    VARIABLES,
    store_path,
    usable_cpus,
)

from . import commands, store_commands  # noqa: E402

STORE = StoreConfig()  # the defaults the help texts name
VALUE = SimpleNamespace(**VALUATION)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdm", description="Compartmentalized diffusion: "
                                     "one shard per contributor, composed at sampling time.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write a demo data set: sklearn's digits (embedded) "
                       "or the emoji studios (pinned npm packages)")
    p.add_argument("dir")
    p.add_argument("--dataset", choices=["digits", "studios"], default="digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contributors", type=int, default=None, metavar="N",
                   help="digits: split the digits among N contributors (one to three digits "
                        "each, one planted low-quality); default: the 7 of the default store")
    p.add_argument("--size", type=int, default=32, help="studios: 16 or 32 pixels a side")
    p.add_argument("--studios", default=None, help="studios: comma-separated subset")
    p.add_argument("--labels", default=None, help="studios: comma-separated category labels")
    p.add_argument("--per-label", type=int, default=None,
                   help="studios: at most this many images of a label per studio and split")
    p.add_argument("--packages", default=None,
                   help="studios: folder of the npm tarballs (default $CDM_NPM_DIR or "
                        "~/.cache/cdm-serve/npm)")
    p.set_defaults(func=store_commands.cmd_demo_data)

    p = sub.add_parser("train", help="train a new store: one shard per DATA_DIR/<id>/")
    p.add_argument("data_dir")
    p.add_argument("--store", required=True)
    p.add_argument("--kind", choices=SHARD_KINDS, default=STORE.kind)
    p.add_argument("--public", help="public images (no contributor owns them): the reference "
                   "of router 'heads' and the base of LoRA shards")
    p.add_argument("--router", choices=ROUTERS, default=STORE.router,
                   help="heads: one density-ratio head per contributor (forget and add touch "
                        "no one else); joint: one classifier on everyone's data")
    p.add_argument("--shard-init", choices=SHARD_INITS, default=None,
                   help="full shards start from random weights (scratch) or from a base "
                        "trained on --public data (base); default: scratch for small images, "
                        "base for 16 px and more when --public is given")
    p.add_argument("--keep-data", action="store_true",
                   help="keep a copy of each contributor's images in the store (always with "
                        "--router joint; needed by the pruned/retrain valuation methods)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-steps", type=int, default=None,
                   help="training steps per shard (and for the LoRA base); default "
                        f"{STORE.shard_train.steps}")
    p.add_argument("--steps-per-images", type=int, default=None, metavar="R",
                   help="a shard of R images trains --shard-steps, any other in proportion "
                        f"to its images (at least {STORE.min_shard_steps} steps); default "
                        f"{STORE.steps_reference_images}")
    p.add_argument("--equal-steps", action="store_true",
                   help="every shard trains --shard-steps, whatever its size")
    p.add_argument("--classifier-steps", type=int, default=None,
                   help="training steps of the joint classifier; default "
                        f"{STORE.classifier_train.steps}")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="bf16: train the shards and the base under bfloat16 autocast (faster "
                        "on CPUs with native bfloat16, far slower elsewhere; weights stay "
                        "float32); auto: bf16 where the device that trains computes it natively, "
                        "else fp32, decided again by each later add; default fp32")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that train the contributors' shards and heads at once "
                        "(CPU), each with an equal share of the threads; default 1")
    p.add_argument("--head-steps", type=int, default=None,
                   help="training steps of each density-ratio head; default "
                        f"{STORE.head_train.steps}")
    p.add_argument("--head-trunk", type=int, default=None, metavar="F",
                   help="the heads read the pooled image's projection on the public data's "
                        "top F principal directions (their cost barely grows with the "
                        "contributors); 0: the pooled pixels; default 64 from 16 pixels a "
                        "side, where it pays off, else 0 (docs/performance.md)")
    p.add_argument("--base", default=None, metavar="DIR",
                   help="a local diffusers Stable Diffusion folder (unet, vae, text_encoder, "
                        "tokenizer, scheduler): LoRA shards on its UNet in its VAE's latent "
                        "space, prompts through its text encoder (docs/usage.md)")
    p.add_argument("--no-text", action="store_true",
                   help="ignore the data's captions: a store conditioned on labels (or "
                        "nothing), where captioned contributors otherwise make a "
                        "text-conditional one")
    p.add_argument("--no-labels", action="store_true",
                   help="ignore the data's labels: an unconditional store (labelled data "
                        "otherwise makes class-conditional shards and router)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.set_defaults(func=store_commands.cmd_train)

    p = sub.add_parser("add", help="add one contributor folder to an existing store")
    p.add_argument("folder")
    p.add_argument("--store", required=True)
    p.add_argument("--kind", choices=SHARD_KINDS, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=store_commands.cmd_add)

    p = sub.add_parser("sample", help="sample from the composition of some contributors")
    p.add_argument("--store", required=True)
    p.add_argument("--contributors", default=None, help="comma-separated ids (default: all)")
    p.add_argument("--prompt", default=None,
                   help="text stores: the prompt of every sample (at most 16 tokens); "
                        "default: none (the null text)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="text stores: classifier-free guidance per shard (1: none; 3-5 "
                        "follow the prompt more closely)")
    p.add_argument("--label", default=None,
                   help="labelled stores: the label of every sample, or one per sample "
                        "(comma-separated); default: drawn from the composition's labels")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", choices=SCHEDULERS, default=SCHEDULERS[0])
    p.add_argument("--mode", choices=MODES, default=MODES[0])
    p.add_argument("--routing", choices=ROUTINGS, default=None,
                   help="dense: every sample on every shard of S; topk (default): each "
                        "sample on its top shards only")
    p.add_argument("--top-k", type=int, default=None,
                   help="topk: at most this many shards per sample (the default routing: "
                        f"{DEFAULT_TOP_K} with --mass {DEFAULT_MASS}; giving --top-k and/or "
                        "--mass sets just those)")
    p.add_argument("--mass", type=float, default=None,
                   help="topk: the fewest shards holding this much weight, in (0, 1]")
    p.add_argument("--draw-above", type=int, default=None,
                   help="topk: at steps whose timestep exceeds this, each sample runs on one "
                        "shard drawn by its weight (an unbiased estimate of the mixture)")
    p.add_argument("--cache-shards", type=int, default=None,
                   help="shards resident at once (default: $CDM_SHARD_CACHE, else "
                        f"{VARIABLES['CDM_SHARD_CACHE'].default})")
    p.add_argument("--router", choices=ROUTERS, default=None,
                   help="check that the store has this router (it is fixed at train time)")
    p.add_argument("--out", required=True, help=".png (grid) or .npz")
    p.add_argument("--device", default=None)
    p.set_defaults(func=store_commands.cmd_sample)

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
    p.set_defaults(func=commands.cmd_keys)

    p = sub.add_parser("forget", help="forget a contributor now: exclude, delete everything "
                       "derived from it, write the audit record")
    p.add_argument("contributor_id")
    p.add_argument("--store", required=True)
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.cmd_forget)

    p = sub.add_parser("jobs", help="list admin jobs; --run runs queued and interrupted ones")
    p.add_argument("--store", required=True)
    p.add_argument("--run", action="store_true",
                   help="run queued jobs and recover those a crash interrupted, then list")
    p.add_argument("--last", type=int, default=20)
    p.add_argument("--device", default=None)
    p.set_defaults(func=commands.cmd_jobs)

    p = sub.add_parser("value", help="Shapley values of the contributors for a property")
    p.add_argument("--store", required=True)
    p.add_argument("--property", default=VALUE.property, choices=PROPERTIES,
                   help=f"default {VALUE.property}: what the default payout policy pays by")
    p.add_argument("--methods", default=",".join(VALUE.methods),
                   help="comma-separated: exact, permutation, kernelshap (Shapley); banzhaf, "
                        "banzhaf-msr, beta-shapley (other semivalues); pruned, retrain; loo, "
                        f"attribution; default {','.join(VALUE.methods)}")
    p.add_argument("--alpha", type=float, default=VALUE.alpha,
                   help="beta-shapley: Beta(alpha, beta) over coalition sizes (> 0)")
    p.add_argument("--beta", type=float, default=VALUE.beta, help="beta-shapley (> 0)")
    p.add_argument("--rank-patience", type=int, default=VALUE.rank_patience, metavar="M",
                   help="sampled methods: stop once the ranking held for M updates (0: off)")
    p.add_argument("--heldout", default=None,
                   help="held-out digits (heldout/<digit>/*.png) to build the store's evaluator")
    p.add_argument("--report", default=None, help="folder for report.md/.json and plots")
    p.add_argument("--n", type=int, default=VALUE.n, help="samples per coalition")
    p.add_argument("--steps", type=int, default=VALUE.steps, help="sampling steps per coalition")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=min(4, usable_cpus()),
                   help="worker processes for coalition evaluations (local, or Ray actors); "
                        "default: the CPU count, at most 4")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="fan out over a Ray cluster at ADDRESS ('local': start Ray here), "
                        "--workers actors restarted when a node dies; every node needs this "
                        "package and the store at the same path (docs/operations.md)")
    p.add_argument("--max-evaluations", type=int, default=VALUE.max_evaluations,
                   help="coalition budget of the sampled estimators")
    p.add_argument("--stderr-tol", type=float, default=VALUE.stderr_tol,
                   help="stop sampled estimators once every stderr is below this")
    p.add_argument("--pruning-ratio", type=float, default=VALUE.pruning_ratio)
    p.add_argument("--monolith-steps", type=int, default=VALUE.monolith_steps)
    p.add_argument("--finetune-steps", type=int, default=VALUE.finetune_steps)
    p.add_argument("--subset-steps", type=int, default=VALUE.subset_steps,
                   help="pruned fine-tune: steps on D_S per coalition")
    p.add_argument("--retrain-steps", type=int, default=VALUE.retrain_steps)
    p.add_argument("--clip-arch", default=None,
                   help="aesthetic: the open_clip model name of a --clip-checkpoint file")
    p.add_argument("--clip-checkpoint", default=None,
                   help="aesthetic: a local CLIP folder (transformers layout) or open_clip "
                        "checkpoint file")
    p.add_argument("--aesthetic-head", default=None, help="aesthetic: local safetensors head")
    p.set_defaults(func=commands.cmd_value)

    p = sub.add_parser("payout", help="show or set the payout policy (which recorded "
                       "valuation credit's payout_share follows)")
    p.add_argument("--store", required=True)
    p.add_argument("--property", default=None, choices=PROPERTIES)
    p.add_argument("--method", default=None, choices=METHODS)
    p.add_argument("--alpha", type=float, default=None, help=f"beta-shapley: default {VALUE.alpha:g}")
    p.add_argument("--beta", type=float, default=None, help=f"beta-shapley: default {VALUE.beta:g}")
    p.set_defaults(func=commands.cmd_payout)

    p = sub.add_parser("serve", help="serve a store over HTTP (BentoML)")
    p.add_argument("--store", default=store_path())
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes; each checks the store before every request "
                        "(default: $CDM_WORKERS, else 1)")
    p.set_defaults(func=commands.cmd_serve)
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
