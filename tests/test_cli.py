import json

import numpy as np
import pytest
from conftest import write_pngs

from service.cli import main
from shards import ShardStore


def test_train_sample_png_and_npz(tmp_path, data_dir, capsys):
    store = tmp_path / "store"
    args = ["train", str(data_dir / "contributors"), "--store", str(store),
            "--public", str(data_dir / "public"), "--head-steps", "6",
            "--shard-steps", "6", "--classifier-steps", "6", "--device", "cpu"]
    assert main(args) == 0
    assert main(["sample", "--store", str(store), "--contributors", "a,b", "--n", "4",
                 "--steps", "3", "--out", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "mean attribution" in printed and "a " in printed
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(["sample", "--store", str(store), "--n", "3", "--steps", "2",
                 "--out", str(tmp_path / "s.npz")]) == 0
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (3, 1, 8, 8)
    assert 0 <= npz["images"].min() and npz["images"].max() <= 1
    assert list(npz["contributor_ids"]) == ["a", "b", "c"]
    np.testing.assert_allclose(npz["attribution_mean"].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(npz["attribution_last"].sum(1), 1, atol=1e-5)


def test_rgb_store_via_cli(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cid, n in (("red", 6), ("blue", 9)):
        write_pngs(tmp_path / "d" / cid, rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), mode="RGB")
    store = tmp_path / "store"
    assert main(["train", str(tmp_path / "d"), "--store", str(store), "--shard-steps", "4",
                 "--steps-per-images", "3", "--classifier-steps", "4", "--router", "joint"]) == 0
    write_pngs(tmp_path / "green", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), mode="RGB")
    assert main(["add", str(tmp_path / "green"), "--store", str(store)]) == 0
    steps = {c: json.loads((store / "shards" / c / "shard.json").read_text())["steps"]
             for c in ("red", "blue", "green")}
    assert steps == {"red": 8, "blue": 12, "green": 8}  # steps in proportion to images
    assert main(["sample", "--store", str(store), "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "rgb.npz")]) == 0
    npz = np.load(tmp_path / "rgb.npz")
    assert npz["images"].shape == (2, 3, 8, 8)
    assert list(npz["contributor_ids"]) == ["blue", "green", "red"]


def test_shard_init_base_from_the_cli(tmp_path, data_dir, capsys):
    """--shard-init base trains the public base first and starts every shard from it;
    without public data it is refused in one line, nothing written."""
    args = ["train", str(data_dir / "contributors"), "--store", str(tmp_path / "x"),
            "--router", "joint", "--shard-init", "base", "--shard-steps", "3",
            "--classifier-steps", "3", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "shard_init 'base'" in err and "--public" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    store = tmp_path / "s"
    assert main(args[:3] + [str(store), "--public", str(data_dir / "public")] + args[4:]
                + ["--precision", "bf16", "--workers", "2"]) == 0
    built = ShardStore.open(store)
    assert built.manifest["base"] is not None and built.config.shard_init == "base"
    assert {built.contributor(c)["init"] for c in built.contributor_ids} == {"base"}
    assert built.config.shard_train.precision == built.config.base_train.precision == "bf16"


def test_precision_auto_is_recorded_as_auto():
    """The store keeps `auto`, not what it meant on the host that built it: a later
    `cdm add` on another host decides for that host (the next test)."""
    from service import store_commands
    from service.cli import build_parser

    args = build_parser().parse_args(["train", "x", "--store", "y", "--precision", "auto",
                                      "--device", "cpu"])
    config = store_commands._store_config(args, (3, 16, 16), public=True)
    assert config.shard_train.precision == config.base_train.precision == "auto"
    assert config.lora_train.precision == "auto"
    assert config.head_train.precision == "fp32"  # the heads are never autocast


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_autocasts_only_where_the_device_computes_bf16(native, monkeypatch):
    """Emulated bfloat16 is many times slower than float32 (docs/performance.md): each
    training run asks its own device."""
    import types

    import torch
    from diffusers import DDPMScheduler

    from shards import training

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, t, **_):
            seen.append(torch.is_autocast_enabled("cpu"))
            return types.SimpleNamespace(sample=x * self.w)

    monkeypatch.setattr(training, "native_bf16", lambda device: native)
    config = training.TrainConfig(steps=2, batch_size=2, warmup_steps=0, precision="auto")
    training.train_denoiser(Probe(), torch.zeros(4, 1, 4, 4), DDPMScheduler(num_train_timesteps=10),
                            config, seed=0, progress=False)
    assert seen == [native, native]
    # and the store records what each run computed in, beside the configured "auto"
    assert config.resolved_precision("cpu") == ("bf16" if native else "fp32")
    assert training.TrainConfig(precision="fp32").resolved_precision("cpu") == "fp32"


def test_each_serve_port_has_its_own_bentoml_home(store_copy, tmp_path, monkeypatch):
    """BentoML empties its home's Prometheus folder when a server starts: two `cdm
    serve` on one machine must not share one, unless the user chose BENTOML_HOME."""
    from service import commands

    homes = []
    monkeypatch.setattr(commands.os, "execve", lambda path, cmd, env: homes.append(env["BENTOML_HOME"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    for port in ("3000", "3001"):
        assert main(["serve", "--store", str(store_copy.root), "--port", port]) in (0, None)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "mine"))
    assert main(["serve", "--store", str(store_copy.root), "--port", "3002"]) in (0, None)
    assert homes == [str(tmp_path / "cache" / "cdm-serve" / "bentoml" / p) for p in ("3000", "3001")] \
        + [str(tmp_path / "mine")]
    assert (tmp_path / "cache" / "cdm-serve" / "bentoml" / "3000").stat().st_mode & 0o077 == 0


def test_native_bf16_knows_this_machine():
    import torch

    from shards.training import native_bf16

    assert native_bf16("cpu") == (torch.cpu._is_avx512_bf16_supported()
                                  or torch.cpu._is_amx_tile_supported())
    assert native_bf16("meta") is False


def test_an_rgb_contributor_added_to_a_grayscale_store_is_refused(store_copy, tmp_path, capsys):
    """One line naming the contributor, its shape and the store's; nothing written."""
    before = sorted(p.relative_to(store_copy.root) for p in store_copy.root.rglob("*")
                    if "valuation" not in p.parts and p.suffix != ".sqlite")
    write_pngs(tmp_path / "zoe", np.zeros((4, 8, 8, 3), dtype=np.uint8), mode="RGB")
    assert main(["add", str(tmp_path / "zoe"), "--store", str(store_copy.root)]) == 2
    err = capsys.readouterr().err.strip()
    assert "zoe" in err and "(3, 8, 8)" in err and "(1, 8, 8)" in err and len(err.splitlines()) == 1
    after = sorted(p.relative_to(store_copy.root) for p in store_copy.root.rglob("*")
                   if "valuation" not in p.parts and p.suffix != ".sqlite")
    assert not [p for p in after if "zoe" in str(p)] and set(before) <= set(after)


@pytest.mark.parametrize("argv, message", [
    (["sample", "--store", "{tmp}/missing", "--out", "{tmp}/x.png"], "no shard store"),
    (["train", "{tmp}/nodata", "--store", "{tmp}/s"], "does not exist"),
    (["train", "{tmp}/nodata", "--store", "{tmp}/s", "--equal-steps", "--steps-per-images", "3"],
     "exclude each other"),
])
def test_errors_are_one_line_with_status_2(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_unknown_contributor_and_bad_out(tmp_path, data_dir, capsys):
    store = tmp_path / "store"
    assert main(["train", str(data_dir / "contributors"), "--store", str(store),
                 "--shard-steps", "3", "--classifier-steps", "3", "--router", "joint"]) == 0
    assert main(["sample", "--store", str(store), "--contributors", "a,zed",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown contributor(s): zed" in capsys.readouterr().err
    assert main(["sample", "--store", str(store), "--n", "1", "--steps", "1",
                 "--out", str(tmp_path / "x.gif")]) == 2
    assert ".png or .npz" in capsys.readouterr().err


def test_value_prints_values_writes_a_report_and_records_credit(store_copy, heldout, tmp_path,
                                                                capsys):
    from service.db import Database

    argv = ["value", "--store", str(store_copy.root), "--heldout", str(heldout), "--methods",
            "exact,loo", "--n", "8", "--steps", "1", "--workers", "1", "--report",
            str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "recorded the exact values" in out
    assert (tmp_path / "r" / "report.md").exists()
    latest = Database(store_copy.root / "service.db").latest_valuations()
    assert set(latest["precision"]["values"]) == {"a", "b", "c"}  # the default property
    assert main(["value", "--store", str(store_copy.root), "--methods", "exact,magic"]) == 2
    assert "allowed" in capsys.readouterr().err
    # the exact run above is what the default payout policy pays by
    assert main(["payout", "--store", str(store_copy.root)]) == 0
    assert "policy: exact values of precision" in capsys.readouterr().out
    # no --methods: exact and Beta(16, 1) Shapley (the coalitions are cached), so an
    # admin can pay by either
    assert main(["value", "--store", str(store_copy.root), "--n", "8", "--steps", "1",
                 "--workers", "1"]) == 0
    assert "beta-shapley" in capsys.readouterr().out
    assert main(["payout", "--store", str(store_copy.root), "--property", "precision",
                 "--method", "beta-shapley"]) == 0
    out = capsys.readouterr().out
    assert "policy: beta-shapley (alpha 16, beta 1) values of precision" in out
    shares = [float(line.split()[1]) for line in out.splitlines() if line.startswith("  ")]
    assert len(shares) == 3 and (sum(shares) == pytest.approx(1.0) or sum(shares) == 0)


def test_add_from_the_shell_is_audited_like_an_api_add(store_copy, data_dir, capsys):
    """`cdm add` runs as an add job: its audit record names the data and weights."""
    import shutil

    from service.db import Database

    folder = store_copy.root.parent / "dora"
    shutil.copytree(data_dir / "contributors" / "c", folder)
    assert main(["add", str(folder), "--store", str(store_copy.root), "--device", "cpu"]) == 0
    assert "added dora" in capsys.readouterr().out
    [record] = Database(store_copy.root / "service.db").audit_log("dora")
    entry = ShardStore.open(store_copy.root).contributor("dora")
    assert record["action"] == "add" and record["actor"].startswith("cli:")
    assert record["details"]["data_hash"] == entry["data_hash"]
    assert record["details"]["weights_hash"] == entry["weights_hash"]
