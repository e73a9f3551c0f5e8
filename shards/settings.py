"""Every name, default and limit of cdm-serve, and the environment variables that set
limits, written once. `shards`, `valuation` and `service` read them from here; the
command line's options and the API's schemas are built from them.

Environment variables are read when asked for (`env_int`, `env_str`, `env_flag`), so a
changed environment applies to the next read; a bad value is a ValueError naming the
variable and what it allows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------ names
SHARD_KINDS = ("full", "lora")  # a UNet per contributor, or a LoRA adapter on a public base
ROUTERS = ("heads", "joint")  # one density-ratio head per contributor, or one classifier
PRIORS = ("size", "uniform")  # lambda_i proportional to |D_i|, or equal
SHARD_INITS = ("scratch", "base")  # a full shard starts from random weights, or the public base
PRECISIONS = ("fp32", "bf16", "auto")  # a denoiser's training: float32, bfloat16 autocast,
# or bfloat16 where the device that trains computes it natively (each run decides)
SCHEDULERS = ("ddpm", "ddim", "dpmpp-2m", "dpmpp-2m-sde", "unipc")  # the first is the default
MODES = ("composed", "naive")  # naive: w_i = 1/|S|, the baseline
ROUTINGS = ("dense", "topk")
PROPERTIES = ("quality", "diversity", "confidence", "precision", "recall", "aesthetic")
# properties the service computes (aesthetic needs local model paths: `cdm value` only)
SERVED_PROPERTIES = tuple(p for p in PROPERTIES if p != "aesthetic")
METHODS = ("exact", "permutation", "kernelshap", "banzhaf", "banzhaf-msr", "beta-shapley",
           "pruned", "retrain", "loo", "attribution")
ROLES = ("user", "contributor", "admin")
JOB_KINDS = ("purge", "add", "value")
CONTRIBUTOR_ID = r"^[a-z0-9][a-z0-9_-]{0,63}$"
MAX_LABEL = 999  # labels are integers 0..MAX_LABEL

# --------------------------------------------------------------- defaults
# Sparse routing: each sample on its top 3 shards, or the fewest holding 90% of its
# weight if fewer (benchmarks/routing_sweep.py; docs/evidence.md).
DEFAULT_TOP_K, DEFAULT_MASS = 3, 0.9
# Beta Shapley's Beta(alpha, beta): (16, 1) is Kwon & Zou's choice for noisy data.
BETA_ALPHA, BETA_BETA = 16.0, 1.0
# A valuation run's settings (valuation/run.py ValuationSettings, `cdm value`, the API's
# `value`). When nothing is named it computes precision by exact Shapley (credit's
# `shapley` and the default payout policy) and by Beta(16, 1) Shapley (the better policy
# on unconditional stores; the same coalitions, so nothing more is sampled).
VALUATION = {
    "property": "precision", "methods": ("exact", "beta-shapley"),
    "n": 256, "steps": 25,  # samples and sampling steps per coalition
    "seed": 0, "scheduler": "ddpm", "workers": 1,
    "max_exact": 10,  # pruned and retrain: exact Shapley up to this many players
    "max_evaluations": 400, "stderr_tol": 0.0, "rank_patience": 0,  # sampled methods
    "pruning_ratio": 0.3, "monolith_steps": 2400, "finetune_steps": 800,  # Lin et al.
    "subset_steps": 100, "retrain_steps": 800,
    "lds_coalitions": 50, "top_k": 3,  # the report's LDS and counterfactual removals
    "alpha": BETA_ALPHA, "beta": BETA_BETA,
}
# Pay by exact Shapley values of precision unless an admin sets a policy: on the
# planted-noise benchmark over the default (class-conditional) store it ranks planted
# contributors lowest with mean AUROC 0.917 and 0.908 (two sampling seeds) and keeps the
# honest order (Spearman 0.730, 0.869); Beta(16, 1) keeps the order better but detects
# less there (0.883, 0.867). On unconditional stores Beta(16, 1) is the better policy
# (docs/evidence.md, "Planted-noise benchmark").
DEFAULT_PAYOUT = {"property": "precision", "method": "exact", "params": None}
SAMPLE_STEPS = 50  # denoising steps of a generate request or `cdm sample`
REQUEST_SECONDS = 600.0  # BentoML's traffic timeout: no request runs longer
PURGE_DRAIN_SECONDS = 600.0  # a purge waits at most this long for older requests
PURGE_RETRY_SECONDS = 600.0  # a failed purge is retried (as a new job) after this long
# A worker (a random instance id) is alive while its heartbeat is fresh: host names and
# pids mislead across containers that share a host name with their own pid namespaces
WORKER_HEARTBEAT_SECONDS = 5.0
WORKER_TIMEOUT_SECONDS = 30.0
MAX_BODY_BYTES = 1 << 20  # JSON a request may send


# ------------------------------------------------------------ environment
@dataclass(frozen=True)
class Variable:
    """An environment variable holding an integer in [low, high] (or 'none' when
    `none` is allowed: no limit)."""

    name: str
    default: int | None
    low: int
    high: int
    doc: str
    none: bool = False


VARIABLES = {v.name: v for v in (
    Variable("CDM_WORKERS", 1, 1, 1024, "worker processes of `cdm serve`"),
    Variable("CDM_MAX_N", 64, 1, 1 << 20, "the largest `n` a generate request may ask for"),
    Variable("CDM_MAX_STEPS", 500, 1, 1 << 20, "the largest `steps` a generate request may ask for"),
    # Cost is what is computed: shard evaluations, n x steps x the most shards an image
    # runs on (routing.Routing.max_shards). The defaults are those of before in images
    # x steps, times the default routing's 3 shards.
    Variable("CDM_MAX_REQUEST_COST", 64 * 500 * 3, 1, 1 << 40,
             "shard evaluations of one request (n x steps x shards per image)"),
    Variable("CDM_KEY_COST_PER_MINUTE", 300_000, 1, 1 << 40,
             "shard evaluations one key may spend per minute, over all workers", none=True),
    # a flood of tiny requests costs the server per request (auth, admission, ledger),
    # not per shard evaluation: bound the count too
    Variable("CDM_KEY_REQUESTS_PER_MINUTE", 600, 1, 1 << 40,
             "generate requests one key may send per minute, over all workers", none=True),
    Variable("CDM_MAX_SHARDS_PER_IMAGE", 16, 1, 1 << 20,
             "the most shards a request may evaluate an image on at a step"),
    # twice the largest request: small requests share the steps of a largest one (of any
    # step count) instead of taking turns with it
    Variable("CDM_MAX_BATCH_ROWS", 128, 1, 1 << 20, "images sampled in one batch"),
    Variable("CDM_MAX_BATCH", 64, 1, 1 << 20, "requests sampled in one batch (1: no batching)"),
    Variable("CDM_MAX_ACTIVE_BATCHES", 8, 1, 1 << 20,
             "batches a worker samples at once; further requests wait for one to end"),
    Variable("CDM_SHARD_CACHE", 1024, 1, 1 << 20, "shards resident at once per worker"),
    # unset ('none'): each step's split between shards' own calls and the stacked pass
    # is chosen by measured cost (shards/passcost.py); a number fixes it, the same on
    # every host (images equal to the bit across hosts, not only within float rounding)
    Variable("CDM_SOLO_ROWS", None, 1, 1 << 20,
             "rows from which a shard's rows in a routed step run as a call of their own",
             none=True),
    Variable("CDM_RAY_WORKERS", 2, 1, 1 << 16,
             "Ray actors of a service valuation job, with CDM_RAY_ADDRESS set"),
    Variable("CDM_AUTH_FAILURES_PER_MINUTE", 20, 1, 1 << 20,
             "failed key checks a client may make per minute and worker before 429"),
    # Folders may come from an untrusted upload, and a small PNG can decode to
    # gigabytes. The pixel limit stays below PIL's own MAX_IMAGE_PIXELS (89478485), so
    # an image PIL would warn about is rejected by ours.
    Variable("CDM_MAX_IMAGE_BYTES", 1 << 20, 1, 1 << 30, "bytes of one image file"),
    Variable("CDM_MAX_IMAGE_PIXELS", 512 * 512, 1, 1 << 26, "pixels an image header may claim"),
    Variable("CDM_MAX_IMAGES", 100_000, 1, 10_000_000, "image files of one folder"),
    Variable("CDM_MAX_DECODED_BYTES", 2 << 30, 1, 1 << 40,
             "bytes the decoded images of one folder may take (float32)"),
)}
# how a store of LoRA shards evaluates them (CDM_LORA_BANK; shards/store.py load_bank)
LORA_BANKS = ("adapters", "merged")
RAY_ENV = "CDM_RAY_ADDRESS"  # the Ray cluster of the service's valuation jobs (unset: here)
# the service's records: a SQLAlchemy URL (postgresql://user:password@host/db for many
# hosts); unset: the SQLite file service.db in the store's folder (service/db.py)
DATABASE_ENV = "CDM_DATABASE_URL"
# a folder on this host's local disk for copies of shard weights read from a shared
# store (shards/localcache.py); unset: read from the store every time
LOCAL_CACHE_ENV = "CDM_LOCAL_CACHE"
STORE_ENV = "CDM_STORE"  # the store `cdm serve` serves (default var/store)
DEFAULT_STORE = "var/store"
DATA_ROOTS_ENV = "CDM_DATA_ROOTS"  # folders a request may name as data (service/paths.py)
METRICS_PUBLIC_ENV = "CDM_METRICS_PUBLIC"  # 1: /metrics without a key
CRASH_ENV = "CDM_CRASH_AT"  # fault injection for the crash tests (shards/faults.py)
CRASH_ONCE_ENV = "CDM_CRASH_ONCE"  # ... and the file that makes it fire once
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "BENTOML_DO_NOT_TRACK": "true"}  # never download


def env_int(name: str) -> int | None:
    """The integer in environment variable `name` (one of VARIABLES), or its default
    when unset; None for 'none' where that means no limit.

    Raises:
        ValueError: naming the variable and its allowed range, for anything else (an
            empty value included: a variable that is set must say something).
    """
    var = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None:
        return var.default
    if var.none and raw.strip().lower() == "none":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not var.low <= value <= var.high:
        extra = " (or 'none': no limit)" if var.none else ""
        raise ValueError(f"{name}={raw[:40]!r} must be an integer in [{var.low}, {var.high}]"
                         f"{extra}")
    return value


def check_int(name: str, value: object, field: str) -> int:
    """`value` if it is an int in the range of variable `name`.

    Raises:
        ValueError: naming `field`, the variable and its range.
    """
    var = VARIABLES[name]
    if isinstance(value, bool) or not isinstance(value, int) or not var.low <= value <= var.high:
        raise ValueError(f"{field}={value!r} ({name}) must be an integer in "
                         f"[{var.low}, {var.high}]")
    return value


def env_str(name: str, default: str | None = None) -> str | None:
    """The text of environment variable `name`, or `default` when unset or empty."""
    raw = os.environ.get(name)
    return raw if raw else default


def env_flag(name: str) -> bool:
    """Whether environment variable `name` is '1' or 'true'."""
    return os.environ.get(name, "").strip().lower() in ("1", "true")


def cache_dir() -> Path:
    """The user's cache folder for cdm-serve: ~/.cache/cdm-serve, under $XDG_CACHE_HOME
    when set (the npm tarballs, each `cdm serve` port's BentoML home)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cdm-serve"


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (a host pinned with taskset, a
    container's cpuset), not every CPU of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def store_path() -> str:
    """The store the service serves: CDM_STORE, else var/store."""
    return env_str(STORE_ENV, DEFAULT_STORE)


def offline() -> None:
    """Set the variables that keep every library from downloading anything (unless
    the caller set them otherwise)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
