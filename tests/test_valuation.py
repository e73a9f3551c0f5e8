"""Valuation on a tiny store: properties, cached utilities, every method end to end,
the report, and the cache's invalidation when a contributor is forgotten."""

import itertools
import json

import numpy as np
import pytest
import torch

from valuation.properties import build_evaluator, load_heldout, load_property
from valuation.run import ValuationSettings, run_valuation
from valuation.utility import CachedUtility, CompositionUtility, prior_images, store_cache

TINY_VALUE = dict(n=16, steps=3, monolith_steps=10, finetune_steps=6, subset_steps=3,
                  retrain_steps=6, lds_coalitions=6, top_k=2)


@pytest.fixture()
def valued_store(joint_copy, heldout):
    """Joint router, data kept: every method (pruned and retrain read the raw data)."""
    build_evaluator(joint_copy.root, heldout)
    return joint_copy


def test_properties_of_the_held_out_digits_themselves(valued_store, heldout):
    images, labels = load_heldout(heldout)
    x = torch.as_tensor(images)
    assert abs(load_property(valued_store.root, "quality")(x)) < 1e-3  # FD to itself
    assert load_property(valued_store.root, "diversity")(x) > 0.9 * np.log(10)
    noise = prior_images(120, (1, 8, 8), seed=0)
    assert load_property(valued_store.root, "quality")(noise) < -1.0
    conf = load_property(valued_store.root, "confidence")
    assert 0.1 <= conf(noise) <= 1.0 and conf(x) > 0.9


def test_property_errors_are_clear(store_copy, tmp_path):
    with pytest.raises(ValueError, match="allowed"):
        load_property(store_copy.root, "beauty")
    with pytest.raises(Exception, match="no evaluator"):
        load_property(store_copy.root, "quality")
    with pytest.raises(Exception, match="one sub-folder per class"):
        load_heldout(tmp_path)
    with pytest.raises(ValueError, match="needs a local CLIP checkpoint"):
        load_property(store_copy.root, "aesthetic")


def tiny_clip(folder, full: bool = False, dim: int = 16):
    """A randomly initialised CLIP (vision tower and projection; `full`: with its text
    tower, as CLIPModel saves it) and a linear aesthetic head, saved locally."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPTextConfig,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=dim)
    torch.manual_seed(0)
    if full:
        text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, projection_dim=dim)
        CLIPModel(CLIPConfig(text_config=CLIPTextConfig(**text).to_dict(),
                             vision_config=CLIPVisionConfig(**vision).to_dict(),
                             projection_dim=dim)).save_pretrained(folder / "clip")
    else:
        CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).save_pretrained(folder / "clip")
    save_file({"weight": torch.randn(1, dim), "bias": torch.tensor([0.5])},
              str(folder / "head.safetensors"))
    return {"checkpoint": str(folder / "clip"), "head": str(folder / "head.safetensors")}


def test_aesthetic_refuses_non_local_paths(store_copy, tmp_path):
    with pytest.raises(Exception, match="not a local file"):
        load_property(store_copy.root, "aesthetic",
                      {"arch": "ViT-B-32", "checkpoint": "laion2b", "head": "head.safetensors"})
    paths = tiny_clip(tmp_path, dim=16)
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(1, 8), "bias": torch.zeros(1)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(Exception, match="head takes 8 features, the CLIP model's embeddings have 16"):
        load_property(store_copy.root, "aesthetic", {**paths, "head": str(tmp_path / "narrow.safetensors")})


@pytest.mark.parametrize("full", [False, True])
def test_aesthetic_is_the_linear_head_on_normalised_clip_embeddings(store_copy, tmp_path, full):
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    paths = tiny_clip(tmp_path, full)
    measure = load_property(store_copy.root, "aesthetic", paths)
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = CLIPVisionModelWithProjection.from_pretrained(paths["checkpoint"]).eval()
    x = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = F.normalize(model(pixel_values=(x - mean) / std).image_embeds, dim=-1)
    head = load_file(paths["head"])
    expected = float((emb @ head["weight"].T + head["bias"]).mean())
    assert measure(images) == pytest.approx(expected, rel=1e-5)
    assert measure(images[:, :1]) != measure(images)  # gray images: the channel repeated
    assert measure.key.startswith("aesthetic:transformers:")


def test_aesthetic_values_a_store_by_composition(store_copy, tmp_path):
    from valuation.shapley import exact_shapley

    u = CachedUtility(CompositionUtility(store_copy.root, "aesthetic", n=6, steps=2,
                                         aesthetic=tiny_clip(tmp_path)))
    values = exact_shapley(u)
    assert values.values.sum() == pytest.approx(values.u_full - values.u_empty, abs=1e-12)
    assert values.u_full != values.u_empty


def test_composition_utility_uses_common_random_numbers_and_the_cache(valued_store):
    source = CompositionUtility(valued_store.root, "quality", n=16, steps=3)
    u = CachedUtility(source, store_cache(valued_store))
    a = frozenset({"a"})
    first = u(a)
    again = CachedUtility(CompositionUtility(valued_store.root, "quality", n=16, steps=3),
                          store_cache(valued_store))
    assert again(a) == first and again.hits == 1 and again.evaluations == 0
    # same seed, any coalition: the same x_T; U(empty) is the property of that x_T
    out = source.sampler(["a"], n=16, steps=3, seed=0)
    assert source.measure(out.images) == first
    assert u(frozenset()) == source.measure(prior_images(16, (1, 8, 8), 0))
    other = CachedUtility(CompositionUtility(valued_store.root, "quality", n=16, steps=3, seed=1),
                          store_cache(valued_store))
    assert other(a) != first and other.evaluations == 1  # settings are part of the key


def test_properties_share_one_sampling_run_per_coalition(valued_store):
    quality = CompositionUtility(valued_store.root, "quality", n=16, steps=3)
    quality.evaluate(frozenset({"a", "b"}))
    confidence = CompositionUtility(valued_store.root, "confidence", n=16, steps=3)
    value = confidence.evaluate(frozenset({"a", "b"}))
    assert confidence._sampler is None  # read from the sample cache, not sampled again
    out = quality.sampler(["a", "b"], n=16, steps=3, seed=0)
    assert value == confidence.measure(out.images)


def test_every_method_end_to_end_and_the_report(valued_store, tmp_path):
    methods = ("exact", "permutation", "kernelshap", "pruned", "retrain", "loo", "attribution")
    settings = ValuationSettings(methods=methods, **TINY_VALUE)
    report, results = run_valuation(valued_store.root, settings, report_dir=tmp_path / "r",
                                    progress=False)
    assert set(results) == set(methods)
    for m in ("exact", "permutation", "kernelshap", "pruned", "retrain", "attribution"):
        assert results[m].efficiency_gap() <= 1e-9, m
    # with 3 players the sampled estimators see all 8 coalitions and agree with exact
    for m in ("permutation", "kernelshap"):
        assert results[m].values == pytest.approx(results["exact"].values, abs=0.5 * np.ptp(
            results["exact"].values) + 1e-9)
    assert results["pruned"].extra["pruned_base"]["kept"] < 1.0
    assert set(report["lds"]) == {"composition", "retrain"}
    assert report["counterfactual"]["composition"]["k"] == [1, 2]
    for name in ("report.md", "report.json", "values.png", "scatter.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    assert json.loads((tmp_path / "r" / "report.json").read_text())["players"] == ["a", "b", "c"]
    assert "| exact |" in (tmp_path / "r" / "report.md").read_text()

    # a rerun reads every coalition from the cache and gives the same numbers
    report2, results2 = run_valuation(valued_store.root, settings, progress=False)
    for m in methods:
        assert results2[m].extra["computed"] == 0, m
        assert results2[m].values == pytest.approx(results[m].values, abs=0, rel=0), m


def test_worker_processes_give_the_same_values(valued_store):
    """Worker processes run with their share of this process's threads (which may be
    more than theirs), and convolutions reduce in another order with another thread
    count: the values agree within float rounding (observed: 5e-8 relative), not bit
    for bit."""
    one, _ = run_valuation(valued_store.root, ValuationSettings(methods=("exact",), **TINY_VALUE),
                           progress=False)
    store_cache(valued_store).root.rename(valued_store.root / "old-cache")
    two, res = run_valuation(valued_store.root, ValuationSettings(
        methods=("exact",), workers=2, **TINY_VALUE), progress=False)
    assert res["exact"].extra["computed"] == 8
    a, b = one["methods"]["exact"]["values"], two["methods"]["exact"]["values"]
    assert a.keys() == b.keys()
    assert all(b[c] == pytest.approx(a[c], rel=1e-6, abs=1e-9) for c in a), (a, b)


def test_bad_settings_and_missing_evaluator(store_copy):
    with pytest.raises(ValueError, match="allowed"):
        ValuationSettings(methods=("exact", "magic"))
    with pytest.raises(Exception, match="no evaluator"):
        run_valuation(store_copy.root, ValuationSettings(**TINY_VALUE), progress=False)


def test_cache_drop_removes_exactly_what_depends_on_the_contributor(valued_store):
    settings = ValuationSettings(methods=("exact", "retrain", "pruned"), **TINY_VALUE)
    run_valuation(valued_store.root, settings, progress=False)
    cache = store_cache(valued_store)
    before = cache.entries()
    assert len(before) == 3 * 8  # every coalition, the empty one included, per method
    dropped = cache.drop("c")
    after = cache.entries()
    # composition and pruned values all saw c (classifier / monolith); retrain only if c in S
    kept = [e for _, e in after]
    assert all(e["method"] == "retrain" and "c" not in e["coalition"] for e in kept)
    samples = 7  # the composition's samples of every non-empty coalition saw c too
    assert len(kept) == 4 and dropped == len(before) - 4 + samples
    assert not list(cache.root.glob("samples/*"))


def test_with_heads_a_composition_value_depends_only_on_its_coalition(store_copy, heldout):
    """Router heads: U(S) of the composition saw only the data of S, so forgetting c
    drops exactly the coalitions holding c (and keeps the others valid)."""
    build_evaluator(store_copy.root, heldout)
    run_valuation(store_copy.root, ValuationSettings(methods=("exact",), **TINY_VALUE),
                  progress=False)
    cache = store_cache(store_copy)
    before = cache.entries()
    assert all(e["depends_on"] == sorted(e["coalition"]) for _, e in before)
    dropped = cache.drop("c")
    assert dropped == 4 + 4  # the 4 values of coalitions with c, and their 4 sample files
    assert all("c" not in e["coalition"] for _, e in cache.entries())
    with pytest.raises(Exception, match="keeps no contributor data"):
        run_valuation(store_copy.root, ValuationSettings(methods=("retrain",), **TINY_VALUE),
                      progress=False)


def test_an_interrupted_run_resumes_from_the_cache(tmp_path):
    from valuation.shapley import exact_shapley
    from valuation.utility import GameUtility, UtilityCache

    calls = []

    def fn(s):
        calls.append(s)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the run dies after four coalitions
        return float(len(s) ** 2)

    cache = UtilityCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        exact_shapley(CachedUtility(GameUtility("abc", fn), cache))
    u = CachedUtility(GameUtility("abc", fn), cache)
    result = exact_shapley(u)
    assert u.hits == 4 and u.evaluations == 4
    assert result.values == pytest.approx([3.0, 3.0, 3.0])


def test_every_utility_source_keeps_the_contract(valued_store, heldout):
    """UtilitySource's contract (valuation/utility.py): keys name the number exactly
    and are stable; depends_on covers S and only names contributors."""
    import itertools

    from valuation.monolith import PrunedFinetuneUtility, RetrainUtility
    from valuation.utility import GameUtility

    root = valued_store.root
    players = valued_store.contributor_ids
    makers = {
        "game": lambda **kw: GameUtility(players, len, "size"),
        "composition": lambda **kw: CompositionUtility(root, "quality", n=8, steps=2, **kw),
        "retrain": lambda **kw: RetrainUtility(root, "quality", n=8, steps=2, **kw),
        "pruned": lambda **kw: PrunedFinetuneUtility(root, "quality", n=8, steps=2, **kw),
    }
    coalitions = [frozenset(c) for k in range(len(players) + 1)
                  for c in itertools.combinations(players, k)]
    seen_keys = {}
    for name, make in makers.items():
        source, again = make(), make()
        keys = [source.key(c) for c in coalitions]
        assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys), name
        assert keys == [again.key(c) for c in coalitions], name  # stable across instances
        assert len(set(keys)) == len(keys), name  # distinct coalitions, distinct numbers
        for c, k in zip(coalitions, keys, strict=True):
            assert seen_keys.setdefault(k, name) == name  # no key shared between methods
            deps = source.depends_on(c)
            assert deps == sorted(deps) and set(c) <= set(deps) <= set(players), (name, c)
        if name != "game":  # every sampling setting is in the key
            full = frozenset(players)
            assert make(seed=1).key(full) != source.key(full), name
            assert make(scheduler="ddim").key(full) != source.key(full), name


def test_the_evaluator_is_rebuilt_for_another_seed(valued_store, heldout):
    folder = build_evaluator(valued_store.root, heldout, seed=0)
    before = (folder / "model.safetensors").read_bytes()
    build_evaluator(valued_store.root, heldout, seed=0)
    assert (folder / "model.safetensors").read_bytes() == before  # same data, same seed: kept
    build_evaluator(valued_store.root, heldout, seed=1)
    assert (folder / "model.safetensors").read_bytes() != before
    assert json.loads((folder / "evaluator.json").read_text())["seed"] == 1


def test_an_unknown_method_is_refused_not_run_as_attribution():
    from valuation.methods import method

    with pytest.raises(ValueError, match="method='magic'; allowed"):
        method("magic")


def test_semivalues_run_through_the_same_utilities(valued_store, heldout):
    settings = ValuationSettings(methods=("exact", "banzhaf", "banzhaf-msr", "beta-shapley"),
                                 n=8, steps=2, max_evaluations=6, alpha=4.0, beta=1.0)
    report, results = run_valuation(valued_store.root, settings, progress=False)
    assert set(report["methods"]) == {"exact", "banzhaf", "banzhaf-msr", "beta-shapley"}
    assert results["banzhaf"].extra["computed"] == 0  # exact's coalitions served them all
    assert results["beta-shapley"].extra["alpha"] == 4.0
    assert results["banzhaf-msr"].evaluations <= 6
    assert results["exact"].efficiency_gap() < 1e-9
    with pytest.raises(ValueError, match="alpha=0"):
        ValuationSettings(alpha=0)
    with pytest.raises(ValueError, match="banzhaff"):
        ValuationSettings(methods=("banzhaff",))


def test_precision_and_recall_separate_fidelity_from_coverage(valued_store, heldout):
    images, labels = load_heldout(heldout)
    x = torch.as_tensor(images)
    precision = load_property(valued_store.root, "precision")
    recall = load_property(valued_store.root, "recall")
    assert precision(x) == 1.0 and recall(x) == 1.0  # the held-out digits themselves
    one_digit = x[torch.as_tensor(labels == labels[0])]  # faithful, but one class of many
    assert precision(one_digit) > 0.9 and recall(one_digit) < 0.5
    noise = prior_images(200, (1, 8, 8), seed=0)
    assert precision(noise) < 0.2
    assert precision.key != recall.key and precision.key.startswith("precision:k3:")


def test_heldout_lds_uses_only_coalitions_the_method_did_not_evaluate(valued_store, tmp_path):
    from valuation import report as rpt

    players = ["a", "b", "c", "d", "e", "f", "g", "h"]
    used = {frozenset("ab"), frozenset("abcd")}
    picked = rpt.heldout_coalitions(players, used, 10, seed=0, fraction=0.5)
    assert len(picked) == 10 and all(len(c) == 4 and c not in used for c in picked)
    assert rpt.heldout_coalitions(players, used, 10, 0, 0.5) == picked  # seeded
    everything = {frozenset(c) for c in itertools.combinations(players, 2)}
    assert rpt.heldout_coalitions(players, everything, 10, 0, 0.25) == []
    summary = rpt.summarise([0.5, 0.7, None, float("nan"), 0.9])
    assert summary["n"] == 3 and summary["mean"] == pytest.approx(0.7)
    assert summary["ci"][0] < 0.7 < summary["ci"][1]
    settings = ValuationSettings(methods=("exact", "banzhaf-msr"), n=8, steps=2,
                                 max_evaluations=5, lds_coalitions=6)
    report, _ = run_valuation(valued_store.root, settings, report_dir=tmp_path, progress=False)
    held = report["lds_heldout"]
    assert held["exact"]["mean"] is None and held["exact"]["n"] == 0  # it used every coalition
    assert len(held["banzhaf-msr"]["runs"]) == 9
    assert "Held-out LDS" in (tmp_path / "report.md").read_text()


def test_a_valuation_beside_a_purge_caches_nothing_of_the_one_being_forgotten(store_copy, heldout):
    """Purges no longer wait for valuations: a valuation that started before an
    exclusion and computes a coalition with the excluded contributor afterwards (its
    files are still there until the purge deletes them) writes no cache entry and no
    sample file for it, so the purge's cleaner has nothing to miss."""
    import json

    from safetensors import safe_open

    build_evaluator(store_copy.root, heldout)
    source = CompositionUtility(store_copy.root, "quality", n=8, steps=2)
    assert source.sampler is not None  # loaded before the exclusion, as a running job's
    u = CachedUtility(source, store_cache(store_copy))
    u(frozenset({"a"}))
    store_copy.exclude("b")
    assert isinstance(u(frozenset({"a", "b"})), float)  # computed, not cached
    entries = store_cache(store_copy).entries()
    assert [e["coalition"] for _, e in entries] == [["a"]]
    for path in (store_copy.root / "valuation" / "cache" / "samples").glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert "b" not in json.loads(f.metadata()["depends_on"])
