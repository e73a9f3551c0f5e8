"""Text conditioning: captions, the frozen MiniLM encoder, text-conditional shards and
heads, prompts with classifier-free guidance in the sampler, CLI and service."""

import csv
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, assert_close, write_pngs

from service.auth import create_key
from service.cli import main
from service.platform import Platform
from shards import ShardStore, StoreConfig, load_contributor, load_contributors
from shards.errors import DataError, TextUnavailableError
from shards.sampler import SampleRequest, compose
from shards.text import MAX_TOKENS, TextEncoder, read_captions

pytestmark = pytest.mark.unit
CONFIG = StoreConfig(shard_train=TINY, base_train=TINY, lora_train=TINY, classifier_train=TINY,
                     classifier_update_steps=4, head_train=TINY)
NAMES = ["zero", "one", "two", "three", "four", "five"]
HOLDS = {"a": [0, 1], "b": [2, 3]}


def digits_of(d, count):
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images / 16 * 255).astype(np.uint8)[digits.target == d][:count]


def captioned(folder, digits, count=8):
    """Digits in <digit>/ folders with a captions.csv: "the digit <name>"."""
    rows = []
    for d in digits:
        write_pngs(folder / str(d), digits_of(d, count))
        rows += [(f"{d}/img-{i:03d}.png", f"the digit {NAMES[d]}") for i in range(count)]
    with open(folder / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("file", "caption"), *rows])
    return folder


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    for cid, digits in HOLDS.items():
        captioned(root / "contributors" / cid, digits)
    captioned(root / "public", [4, 5], 6)
    return root


@pytest.fixture(scope="module", params=["full", "lora"])
def text_store(request, tmp_path_factory, text_dir):
    public = load_contributor(text_dir / "public", "public")
    return ShardStore.create(tmp_path_factory.mktemp("ts") / request.param,
                             load_contributors(text_dir / "contributors"),
                             CONFIG.replace(kind=request.param), public=public.images,
                             public_captions=list(public.captions), text=True, device="cpu",
                             progress=False)


# ------------------------------------------------------------------ captions
def test_captions_csv_and_txt_sidecars_read_the_same(tmp_path):
    csv_dir = captioned(tmp_path / "csv", [0, 1], 3)
    txt_dir = tmp_path / "txt"
    for d in (0, 1):
        write_pngs(txt_dir / str(d), digits_of(d, 3))
        for i in range(3):
            (txt_dir / str(d) / f"img-{i:03d}.txt").write_text(f"  the digit\n{NAMES[d]} ")
    a, b = load_contributor(csv_dir, "a"), load_contributor(txt_dir, "a")
    assert a.captions == b.captions == ("the digit zero",) * 3 + ("the digit one",) * 3
    plain = tmp_path / "plain"
    write_pngs(plain / "0", digits_of(0, 3))
    assert load_contributor(plain, "a").captions is None


def test_the_data_hash_covers_the_captions(tmp_path):
    folder = captioned(tmp_path / "c", [0], 3)
    before = load_contributor(folder, "c").data_hash
    text = (folder / "captions.csv").read_text().replace("zero", "nought")
    (folder / "captions.csv").write_text(text)
    assert load_contributor(folder, "c").data_hash != before


@pytest.mark.parametrize("breaks, message", [
    (lambda f: (f / "captions.csv").write_text("file,caption\n0/img-000.png,zero\n"),
     r"0/img-001\.png has no caption in captions\.csv"),
    (lambda f: (f / "captions.csv").write_text(
        (f / "captions.csv").read_text() + "0/ghost.png,boo\n"),
     r"captions\.csv captions 0/ghost\.png, which is not an image"),
    (lambda f: (f / "captions.csv").write_text("file,caption\n0/img-000.png,a,b\n"),
     r"row 2 has 3 fields"),
    (lambda f: (f / "captions.csv").write_text(
        (f / "captions.csv").read_text().replace("the digit zero", " ", 1)),
     r"row 2: a caption must have 1 to 300 characters"),
    (lambda f: (f / "0" / "img-000.txt").write_text("zero"),
     r"both captions\.csv and img-000\.txt give captions"),
])
def test_caption_errors_name_the_file(tmp_path, breaks, message):
    folder = captioned(tmp_path / "c", [0], 3)
    breaks(folder)
    with pytest.raises(DataError, match=message):
        load_contributor(folder, "c")


def test_a_missing_sidecar_is_named(tmp_path):
    folder = tmp_path / "c"
    write_pngs(folder, digits_of(0, 2))
    (folder / "img-000.txt").write_text("zero")
    with pytest.raises(DataError, match=r"img-001\.png has no caption \(img-001\.txt\)"):
        read_captions(folder, sorted(folder.glob("*.png")), "contributor 'c'", 10_000)


# ------------------------------------------------------------------ encoder
def test_the_encoder_loads_offline_and_encodes_prompts():
    enc = TextEncoder.shared()
    out = enc.encode(["red apple", "flag: Japan", ""])
    assert out.tokens.shape == (3, MAX_TOKENS, 384) and out.mask.shape == (3, MAX_TOKENS)
    assert out.mask.sum(1).tolist() == [4, 5, 2]  # [CLS] ... [SEP]
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(3), atol=1e-5)
    apple, pear, flag = enc.encode(["red apple", "green pear", "flag: Japan"]).pooled
    assert float(apple @ pear) > float(apple @ flag)  # a real sentence encoder
    assert_close(enc.encode(["red apple"]).tokens, out.tokens[:1])


@pytest.mark.parametrize("prompt, message", [
    ("", "non-empty"), ("   ", "non-empty"), (3, "non-empty"),
    ("word " * 20, rf"22 tokens long; the text encoder \(all-MiniLM-L6-v2\) takes at most {MAX_TOKENS}"),
    ("x" * 301, "at most 300"),
])
def test_bad_prompts_are_refused_with_the_limit(prompt, message):
    with pytest.raises(ValueError, match=message):
        TextEncoder.shared().check_prompt(prompt)


# ------------------------------------------------------------------ store and sampler
def test_text_store_records_its_encoder_and_conditions_its_models(text_store):
    from diffusers import UNet2DConditionModel

    assert text_store.text["name"] == "all-MiniLM-L6-v2" and len(text_store.text["weights_hash"]) == 64
    assert text_store.num_labels == 0  # captions replace the labels
    assert isinstance(text_store.load_shard("a"), UNet2DConditionModel)
    assert text_store.contributor("a")["captions"] == 2
    assert text_store.load_router().text


def test_stacked_text_pass_equals_each_shard_alone(text_store):
    """The bank's stacked rows (layer norms, attention, cross-attention per row) give
    each shard's own output, the prompt's and the null text's."""
    bank = text_store.load_bank()
    enc = TextEncoder.shared()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 400, 800, 999])
    cond = enc.encode(["the digit two", "", "one", "the digit zero"])
    ids = ["a", "b", "b", "a"]
    stacked = bank.evaluate(x, t, ids, text=cond)
    for r, cid in enumerate(ids):
        alone = text_store.load_shard(cid)(x[r:r + 1], t[r:r + 1], **cond[r:r + 1].unet_kwargs()).sample
        assert_close(stacked[r:r + 1], alone, atol=1e-5)


def test_one_contributor_with_a_prompt_is_that_shard_alone(text_store):
    """Restricted composition, closed form: S = {a} samples exactly shard a with the
    prompt, guidance included (weight 1, no router)."""
    s = text_store.load_sampler("cpu")
    out = s(["a"], n=3, steps=4, seed=5, prompt="the digit one", guidance=3.0)
    alone = compose({"a": text_store.load_shard("a")}, dict(text_store.noise_schedule().config),
                    text_store.image_shape, text_encoder=TextEncoder.shared())
    ref = alone(n=3, steps=4, seed=5, prompt="the digit one", guidance=3.0)
    assert_close(out.images, ref.images, atol=1e-5)


def test_prompts_and_guidance_batch_with_anything(text_store):
    s = text_store.load_sampler("cpu")
    reqs = [SampleRequest(None, 3, 1, prompt="the digit zero", guidance=2.0),
            SampleRequest(("a",), 2, 2, prompt="one"), SampleRequest(None, 2, 3)]
    batched = s.sample_batch(reqs, 4)
    for req, out in zip(reqs, batched, strict=True):
        assert_close(out.images, s.sample_batch([req], 4)[0].images, atol=1e-5)


def test_guidance_one_is_the_conditional_and_above_it_evaluates_twice(text_store):
    s = text_store.load_sampler("cpu")
    s.shard_rows = 0
    plain = s(n=2, steps=3, seed=0, prompt="the digit two")
    once = s.shard_rows
    s.shard_rows = 0
    guided = s(n=2, steps=3, seed=0, prompt="the digit two", guidance=4.0)
    assert s.shard_rows == 2 * once
    assert (plain.images - guided.images).abs().max() > 1e-4
    s.shard_rows = 0
    free = s(n=2, steps=3, seed=0)
    assert (plain.images - free.images).abs().max() > 1e-4  # the prompt matters
    unguided_rows = s.shard_rows
    s.shard_rows = 0
    assert_close(s(n=2, steps=3, seed=0, guidance=4.0).images, free.images)  # nothing to guide
    assert s.shard_rows == unguided_rows


def test_prompts_and_labels_go_only_where_the_store_takes_them(text_store, full_store):
    with pytest.raises(TextUnavailableError, match="takes no label; it supports prompts"):
        text_store.load_sampler("cpu").sample_batch([SampleRequest(None, 1, 0, (1,))], 2)
    with pytest.raises(TextUnavailableError, match="no text conditioning, so it takes no prompt"):
        full_store.load_sampler("cpu")(n=1, steps=2, prompt="zero")
    with pytest.raises(ValueError, match="guidance=25"):
        text_store.load_sampler("cpu")(n=1, steps=2, prompt="zero", guidance=25)


def test_forgetting_in_a_text_store_leaves_what_a_store_without_it_has(text_store, tmp_path,
                                                                      text_dir):
    shutil.copytree(text_store.root, tmp_path / "s")
    store = ShardStore.open(tmp_path / "s")
    store.exclude("b")
    store.purge("b", device="cpu")
    public = load_contributor(text_dir / "public", "public")
    without = ShardStore.create(tmp_path / "without", [d for d in load_contributors(
        text_dir / "contributors") if d.contributor_id != "b"], store.config,
        public=public.images, public_captions=list(public.captions), text=True,
        device="cpu", progress=False)
    for part in ("weights_hash",):
        assert store.contributor("a")[part] == without.contributor("a")[part]
    assert store.contributor("a")["head"]["weights_hash"] == without.contributor("a")["head"]["weights_hash"]
    assert not [p for p in (tmp_path / "s").rglob("*") if p.name == "b"]
    out = store.load_sampler("cpu")(n=2, steps=2, prompt="the digit two")
    assert out.contributor_ids == ["a"]


def test_text_store_refuses_what_it_cannot_take(tmp_path, text_dir, text_store):
    datasets = load_contributors(text_dir / "contributors")
    public = load_contributor(text_dir / "public", "public")
    with pytest.raises(DataError, match="router 'joint' does not take text conditioning"):
        ShardStore.create(tmp_path / "j", datasets, CONFIG.replace(router="joint"),
                          public=public.images, public_captions=list(public.captions), text=True,
                          progress=False)
    with pytest.raises(DataError, match="the public data has no captions"):
        ShardStore.create(tmp_path / "p", datasets, CONFIG, public=public.images, text=True,
                          progress=False)
    bare = tmp_path / "bare"
    write_pngs(bare / "c" / "0", digits_of(0, 4))
    with pytest.raises(DataError, match="contributor 'c' has no captions"):
        ShardStore.create(tmp_path / "n", [*datasets, load_contributor(bare / "c")], CONFIG,
                          public=public.images, public_captions=list(public.captions), text=True,
                          progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(text_store.root, copy)
    with pytest.raises(DataError, match="'c' has no captions .* this store is text-conditional"):
        ShardStore.open(copy).add(load_contributor(bare / "c"), device="cpu", progress=False)


# ------------------------------------------------------------------ CLI and service
def test_cli_trains_a_text_store_from_captions_and_samples_a_prompt(tmp_path, text_dir, capsys):
    store = tmp_path / "store"
    args = ["train", str(text_dir / "contributors"), "--store", str(store), "--public",
            str(text_dir / "public"), "--shard-steps", "4", "--head-steps", "4"]
    assert main(args) == 0
    assert "text-conditional: prompts through all-MiniLM-L6-v2" in capsys.readouterr().out
    assert main(["sample", "--store", str(store), "--prompt", "the digit one", "--guidance", "2",
                 "--n", "2", "--steps", "2", "--out", str(tmp_path / "one.npz")]) == 0
    assert np.load(tmp_path / "one.npz")["images"].shape == (2, 1, 8, 8)
    assert main(["sample", "--store", str(store), "--label", "1", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "takes no label" in capsys.readouterr().err
    labelled = tmp_path / "labelled"
    assert main([*args[:3], str(labelled), *args[4:], "--no-text"]) == 2  # public lacks 0-3
    assert "public data has no image of label(s) [0, 1, 2, 3]" in capsys.readouterr().err
    assert main([*args[:3], str(labelled), *args[4:], "--no-text", "--no-labels"]) == 0
    assert ShardStore.open(labelled).text is None and ShardStore.open(labelled).num_labels == 0


def test_service_generates_from_a_prompt(text_store, full_store, tmp_path):
    shutil.copytree(text_store.root, tmp_path / "s")
    platform = Platform(tmp_path / "s", device="cpu")
    try:
        rows = {r["contributor_id"]: r["captions"] for r in platform.contributors()}
        assert rows == {"a": 2, "b": 2}
        user = platform.verify(f"Bearer {create_key(platform.db, 'u', ['a', 'b'])}")
        out = platform.generate(user, n=2, steps=2, prompt="the digit three", guidance=2.0)
        assert out["prompt"] == "the digit three" and len(out["images"]) == 2
        record = platform.attribution(user, out["request_id"])
        assert record["params"]["prompt"] == "the digit three" and record["params"]["guidance"] == 2.0
        def spent():
            return platform.db.spent(user.key_id)

        before = spent()
        assert before > 0
        with pytest.raises(ValueError, match="takes at most 16"):
            platform.generate(user, n=1, steps=2, prompt="many words " * 10)
        assert spent() == before  # refused before sampling: not billed
        bare = tmp_path / "bare"
        write_pngs(bare / "0", digits_of(0, 3))
        with pytest.raises(DataError, match="has no captions .* this store is text-conditional"):
            platform.add_contributor(admin_of(platform), str(bare), anywhere=True)
        assert not platform.db.jobs()  # nothing queued
        with pytest.raises(TextUnavailableError):
            platform.generate(user, n=1, steps=2, label=1)
    finally:
        platform.close()
    shutil.copytree(full_store.root, tmp_path / "f")
    platform = Platform(tmp_path / "f", device="cpu")
    try:
        admin = platform.verify(f"Bearer {create_key(platform.db, 'root', None, role='admin')}")
        with pytest.raises(TextUnavailableError, match="supports neither labels nor prompts"):
            platform.generate(admin, n=1, steps=2, prompt="zero")
    finally:
        platform.close()


def admin_of(platform):
    return platform.verify(f"Bearer {create_key(platform.db, 'root', None, role='admin')}")


def test_public_hashes_cover_captions_and_long_captions_are_noted(text_store, text_dir, caplog):
    from shards.files import tensor_hash
    from shards.text import Captions

    public = load_contributor(text_dir / "public", "public")
    reference = text_store.manifest["reference"]["data_hash"]
    assert reference == tensor_hash(public.images, None, list(public.captions))
    assert reference != tensor_hash(public.images)
    long = " ".join(["word"] * 20)
    with caplog.at_level("WARNING", logger="cdm"):
        captions = Captions(["short", long], TextEncoder.shared())
    assert captions.truncated == 1 and "longer than the text encoder's 16 tokens" in caplog.text


def test_training_captions_are_not_cached_and_prompts_are_bounded(monkeypatch):
    """A serving process keeps no contributor's captions after training, and a stream of
    distinct prompts does not grow its memory without bound."""
    from shards import text
    from shards.text import Captions

    enc = TextEncoder.shared()
    Captions(["a caption of someone's own", "another one"], enc)
    assert "a caption of someone's own" not in enc._cache
    monkeypatch.setattr(text, "CACHE_TEXTS", 3)
    out = enc.encode([f"prompt {i}" for i in range(5)])
    assert len(enc._cache) == 3 and "prompt 4" in enc._cache and "prompt 0" not in enc._cache
    assert_close(out[:1].tokens, enc.encode(["prompt 0"]).tokens)  # recomputed, the same
