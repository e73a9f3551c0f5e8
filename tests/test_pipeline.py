"""A pretrained latent base (`cdm train --base DIR`): LoRA shards on a Stable Diffusion
folder's UNet, composed on its VAE's latents, prompts through its CLIP text encoder.
Everything runs on a tiny randomly initialised pipeline the tests save locally
(tests/tiny_pipeline.py); nothing is downloaded."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, write_pngs
from tiny_pipeline import make_tiny_pipeline

from service.auth import create_key
from service.cli import main
from service.platform import Platform
from shards import ShardStore, load_contributor, load_contributors
from shards.errors import DataError
from shards.pipeline import LORA_FILE, check_pipeline
from shards.sampler import compose
from valuation.properties import build_evaluator
from valuation.shapley import exact_shapley
from valuation.utility import CachedUtility, CompositionUtility

pytestmark = pytest.mark.unit
CONFIG = TINY_CONFIG.replace(kind="lora")
COLOURS = {"red": (1.0, 0.2, 0.2), "blue": (0.2, 0.3, 1.0), "green": (0.2, 1.0, 0.3)}


def coloured(folder, digits, colour, count=6, side=16):
    """Digits upscaled to `side` px and tinted `colour`, in <digit>/ folders, with a
    captions.csv: "a <colour> digit <d>"."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rows = []
    for d in digits:
        gray = data.images[data.target == d][:count] / 16
        big = np.kron(gray, np.ones((side // 8, side // 8)))
        rgb = (big[..., None] * np.array(COLOURS[colour]) * 255).astype(np.uint8)
        write_pngs(folder / str(d), rgb, mode="RGB")
        rows += [(f"{d}/img-{i:03d}.png", f"a {colour} digit {d}") for i in range(count)]
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "caption"), *rows])
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    make_tiny_pipeline(root / "pipeline")
    coloured(root / "contributors" / "a", [0, 1], "red")
    coloured(root / "contributors" / "b", [2, 3], "blue")
    coloured(root / "public", [4, 5], "green", 4)
    coloured(root / "c", [6], "red")
    for d in (0, 2):  # held out: labelled folders for the valuation's evaluator
        coloured(root / "heldout-raw", [d], "red" if d == 0 else "blue", 6)
        shutil.copytree(root / "heldout-raw" / str(d), root / "heldout" / str(d // 2))
    return root


def build(sd_dir, root, contributors=("a", "b")):
    public = load_contributor(sd_dir / "public", "public")
    datasets = [d for d in load_contributors(sd_dir / "contributors") if d.contributor_id in contributors]
    return ShardStore.create(root, datasets, CONFIG, public=public.images,
                             public_captions=list(public.captions), text=True, device="cpu",
                             progress=False, pipeline=sd_dir / "pipeline")


@pytest.fixture(scope="module")
def sd_store(sd_dir, tmp_path_factory):
    return build(sd_dir, tmp_path_factory.mktemp("sds") / "store")


# ------------------------------------------------------------------ the folder
def _break(folder, how):
    if how == "index":
        (folder / "model_index.json").unlink()
    elif how == "vae":
        shutil.rmtree(folder / "vae")
    elif how == "weights":
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "v":
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "v_prediction"}))
    elif how == "width":
        path = folder / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "cross_attention_dim": 64}))


@pytest.mark.parametrize("how, message", [
    ("index", "no model_index.json; not a diffusers pipeline folder"),
    ("vae", "missing vae/config.json"),
    ("weights", "missing unet/ weights"),
    ("v", "predicts 'v_prediction'; only epsilon"),
    ("width", "cross-attends to width 64, the text encoder's is 32"),
])
def test_a_base_that_is_not_a_pipeline_is_named_in_one_line(sd_dir, tmp_path, how, message):
    folder = tmp_path / "p"
    shutil.copytree(sd_dir / "pipeline", folder)
    _break(folder, how)
    with pytest.raises(DataError, match=message):
        check_pipeline(folder)


def test_the_cli_refuses_a_bad_base_before_reading_data(tmp_path, sd_dir, capsys):
    args = ["train", str(sd_dir / "contributors"), "--store", str(tmp_path / "s"), "--public",
            str(sd_dir / "public"), "--base", str(tmp_path / "nowhere")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "not a folder" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "s").exists()
    assert main([*args[:-1], str(sd_dir / "pipeline"), "--no-text"]) == 2
    assert "drop --no-text" in capsys.readouterr().err


def test_a_pipeline_store_needs_captions_and_matching_images(sd_dir, tmp_path):
    gray = tmp_path / "gray"
    write_pngs(gray / "x" / "0", np.zeros((3, 16, 16), np.uint8))
    (gray / "x" / "captions.csv").write_text("".join(f"0/img-00{i}.png,dark\n" for i in range(3)))
    with pytest.raises(DataError, match="1 channel.*VAE takes 3"):
        ShardStore.create(tmp_path / "s", [load_contributor(gray / "x")], CONFIG, text=True,
                          public=torch.zeros(2, 1, 16, 16), public_captions=["a", "b"],
                          progress=False, pipeline=sd_dir / "pipeline")
    datasets = load_contributors(sd_dir / "contributors")
    public = load_contributor(sd_dir / "public", "public")
    with pytest.raises(DataError, match="pipeline is text-conditional"):
        ShardStore.create(tmp_path / "t", datasets, CONFIG, public=public.images,
                          progress=False, pipeline=sd_dir / "pipeline")
    with pytest.raises(DataError, match="LoRA adapters .* not 'full'"):
        ShardStore.create(tmp_path / "u", datasets, TINY_CONFIG, public=public.images, text=True,
                          public_captions=list(public.captions), progress=False,
                          pipeline=sd_dir / "pipeline")


# ------------------------------------------------------------------ the store
def test_a_pipeline_store_is_lora_on_latents_with_the_pipelines_text_encoder(sd_store):
    assert sd_store.image_shape == (4, 8, 8) and sd_store.pixel_shape == (3, 16, 16)
    assert sd_store.text["kind"] == "pipeline" and sd_store.text["dim"] == 32
    assert sd_store.manifest["base"]["pretrained"]
    assert sd_store.noise_schedule().config.beta_schedule == "scaled_linear"
    assert {sd_store.contributor(c)["kind"] for c in "ab"} == {"lora"}
    assert (sd_store.root / "pipeline" / "vae" / "config.json").is_file()
    out = sd_store.load_sampler("cpu")(n=3, steps=3, seed=1, prompt="a red digit 0", guidance=2.0)
    assert out.images.shape == (3, 3, 16, 16) and 0 <= out.images.min() <= out.images.max() <= 1
    assert out.contributor_ids == ["a", "b"]
    assert torch.allclose(out.attribution_mean.sum(1), torch.ones(3, dtype=out.attribution_mean.dtype))


def test_each_shard_loads_in_plain_diffusers_as_the_store_evaluates_it(sd_store):
    from diffusers import StableDiffusionPipeline

    sampler = sd_store.load_sampler("cpu")
    text = sampler.text_encoder.encode(["a red digit 1", ""])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([20, 700])
    for cid in ("a", "b"):
        assert (sd_store.root / "shards" / cid / LORA_FILE).is_file()
        pipe = StableDiffusionPipeline.from_pretrained(sd_store.root / "pipeline", safety_checker=None)
        pipe.load_lora_weights(sd_store.root / "shards" / cid)
        with torch.no_grad():
            plain = pipe.unet(x, t, encoder_hidden_states=text.tokens).sample
            base = pipe.unet.__class__.from_pretrained(sd_store.root / "pipeline" / "unet")(
                x, t, encoder_hidden_states=text.tokens).sample
        ours = sampler.bank.evaluate(x, t, [cid, cid], text=text)
        torch.testing.assert_close(ours, plain, atol=1e-4, rtol=1e-4)
        assert (ours - base).abs().max() > 1e-3  # the adapter is not the identity


def test_one_contributor_is_its_shard_alone_decoded_by_the_vae(sd_store):
    sampler = sd_store.load_sampler("cpu")
    alone = compose({"a": sd_store.load_shard("a")}, dict(sd_store.noise_schedule().config),
                    sd_store.image_shape, text_encoder=sampler.text_encoder,
                    decoder=sd_store.latent_codec().decode)
    for prompt, guidance in (("a red digit 0", 3.0), (None, 1.0)):
        ours = sampler(["a"], n=2, steps=3, seed=4, prompt=prompt, guidance=guidance).images
        ref = alone(n=2, steps=3, seed=4, prompt=prompt, guidance=guidance).images
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_forgetting_leaves_what_a_store_built_without_it_has(sd_store, sd_dir, tmp_path):
    shutil.copytree(sd_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    pipeline_hash = {p.name: p.stat().st_size for p in (tmp_path / "s" / "pipeline").rglob("*")}
    store.forget("b", device="cpu")
    without = build(sd_dir, tmp_path / "without", contributors=("a",))
    assert store.contributor("a")["weights_hash"] == without.contributor("a")["weights_hash"]
    assert store.contributor("a")["head"]["weights_hash"] == without.contributor("a")["head"]["weights_hash"]
    assert not [p for p in (tmp_path / "s").rglob("*") if p.name == "b"]
    assert pipeline_hash == {p.name: p.stat().st_size for p in (tmp_path / "s" / "pipeline").rglob("*")}
    assert store.load_sampler("cpu")(n=1, steps=2, prompt="a blue digit 2").contributor_ids == ["a"]


def test_an_added_contributor_brings_pixels_of_the_stores_size(sd_store, sd_dir, tmp_path):
    shutil.copytree(sd_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    small = tmp_path / "small"
    coloured(small, [7], "red", side=8)
    with pytest.raises(DataError, match=r"\(3, 8, 8\) \(C, H, W\), expected \(3, 16, 16\)"):
        store.add(load_contributor(small, "d"), device="cpu", progress=False)
    entry = store.add(load_contributor(sd_dir / "c", "c"), device="cpu", progress=False)
    assert entry["kind"] == "lora" and (store.root / "shards" / "c" / LORA_FILE).is_file()
    out = store.load_sampler("cpu")(["c"], n=2, steps=2, prompt="a red digit 6")
    assert out.images.shape == (2, 3, 16, 16)


def test_shapley_values_by_composition_are_efficient(sd_store, sd_dir, tmp_path):
    shutil.copytree(sd_store.root, tmp_path / "s")
    build_evaluator(tmp_path / "s", sd_dir / "heldout")
    u = CachedUtility(CompositionUtility(tmp_path / "s", "diversity", n=8, steps=2))
    values = exact_shapley(u)
    assert values.players == ["a", "b"] and u.evaluations == 4
    assert values.u_full == u(frozenset("ab")) != values.u_empty == u(frozenset())
    assert values.values.sum() == pytest.approx(values.u_full - values.u_empty, abs=1e-12)
    with pytest.raises(DataError, match="value it by composition"):
        from valuation.monolith import RetrainUtility

        RetrainUtility(tmp_path / "s", "diversity")


# ------------------------------------------------------------------ CLI and service
def test_cli_trains_on_a_base_folder_and_samples_a_prompt(sd_dir, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["train", str(sd_dir / "contributors"), "--store", str(store), "--public",
                 str(sd_dir / "public"), "--base", str(sd_dir / "pipeline"), "--shard-steps", "3",
                 "--head-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "on the pipeline's text encoder" in out and "pretrained latent base" in out and "3x16x16 images as 4x8x8 latents" in out
    assert main(["sample", "--store", str(store), "--prompt", "a blue digit 3", "--guidance", "2",
                 "--n", "2", "--steps", "2", "--out", str(tmp_path / "x.npz")]) == 0
    assert np.load(tmp_path / "x.npz")["images"].shape == (2, 3, 16, 16)


def test_the_service_generates_and_adds_on_a_pipeline_store(sd_store, sd_dir, tmp_path):
    shutil.copytree(sd_store.root, tmp_path / "s")
    platform = Platform(tmp_path / "s", device="cpu")
    try:
        admin = platform.verify(f"Bearer {create_key(platform.db, 'root', None, role='admin')}")
        out = platform.generate(admin, n=2, steps=2, prompt="a red digit 1", guidance=2.0)
        assert out["prompt"] == "a red digit 1" and len(out["images"]) == 2
        job = platform.add_contributor(admin, str(sd_dir / "c"), anywhere=True)
        platform.run_jobs()
        assert platform.db.get_job(job["job_id"])["status"] == "succeeded"
        assert platform.store.contributor("c")["kind"] == "lora"
    finally:
        platform.close()
