import pytest
import torch
from conftest import assert_close

from shards.errors import UnknownContributorError
from shards.routing import Routing
from shards.sampler import SCHEDULER_SPECS
from shards.settings import SCHEDULERS


@pytest.fixture(scope="module")
def sampler(full_store):
    return full_store.load_sampler("cpu")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_same_seed_same_images(sampler, scheduler):
    o1 = sampler(None, n=4, steps=5, seed=3, scheduler=scheduler)
    o2 = sampler(None, n=4, steps=5, seed=3, scheduler=scheduler)
    o3 = sampler(None, n=4, steps=5, seed=4, scheduler=scheduler)
    assert torch.equal(o1.images, o2.images)
    assert not torch.equal(o1.images, o3.images)


def test_images_and_attribution_shapes(sampler):
    out = sampler(["c", "a"], n=5, steps=4, seed=0)
    assert out.images.shape == (5, 1, 8, 8)
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert out.contributor_ids == ["a", "c"]  # store order
    for att in (out.attribution_mean, out.attribution_last):
        assert att.shape == (5, 2)
        assert_close(att.sum(1), torch.ones(5))
        assert (att >= 0).all()


def test_naive_mode_is_uniform(sampler):
    out = sampler(None, n=3, steps=3, seed=0, mode="naive")
    assert_close(out.attribution_mean, torch.full((3, 3), 1 / 3))


def test_every_scheduler_is_named_in_settings():
    assert tuple(SCHEDULER_SPECS) == SCHEDULERS


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_single_contributor_equals_that_shard_alone(sampler, full_store, scheduler):
    """Restricted to {b}, w_b = 1: the composition is shard b's own sampling chain,
    with diffusers' own scheduler (multistep solvers included)."""
    out = sampler(["b"], n=3, steps=6, seed=2, scheduler=scheduler)
    unet = full_store.load_shard("b")
    spec = SCHEDULER_SPECS[scheduler]
    sched = spec.make(sampler.schedule_config, 6)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((3, 1, 8, 8), generator=generator)
    step_kw = {"generator": generator} if spec.stochastic else {}
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    assert_close(out.images, (x.clamp(-1, 1) + 1) / 2, atol=1e-5)
    assert torch.all(out.attribution_mean == 1)


class GaussianScores(torch.nn.Module):
    """A router with known densities: shard i's noised data is N(mu_i, s^2 I), so its
    scores are log p^i(x) up to a constant shared by all i."""

    def __init__(self, ids, centres, s=4.0):
        super().__init__()
        self.contributor_ids, self.centres, self.s = list(ids), centres, s

    def log_ratios(self, x_t, t, y=None):
        d = ((x_t[:, None] - self.centres[None]) ** 2).flatten(2).sum(-1)  # (B, K)
        return -d / (2 * self.s ** 2)


@pytest.mark.parametrize("subset", [None, ("a", "c"), ("b",)])
def test_the_samplers_weights_are_the_posterior_restricted_to_s(full_store, subset):
    """The weights the sampler uses (the last step's attribution of a one-step sample,
    at x_T) equal the closed form lambda_i p(x_T | i) / sum_{j in S} lambda_j p(x_T | j),
    with p Gaussian (a router of known densities) and the priors the sampler is given."""
    from shards.sampler import compose

    ids = ["a", "b", "c"]
    centres = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    priors = {"a": 1.0, "b": 2.0, "c": 5.0}
    sampler = compose(full_store.load_bank(), dict(full_store.noise_schedule().config), (1, 8, 8),
                      GaussianScores(ids, centres), priors)
    out = sampler(subset, n=5, steps=1, seed=3, routing=Routing())
    x_t = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(3))  # x_T of seed 3
    chosen = list(subset or ids)
    d = ((x_t[:, None] - centres[None]) ** 2).flatten(2).sum(-1)
    logits = torch.log(torch.tensor([priors[c] for c in ids])) - d / (2 * 4.0 ** 2)
    keep = [ids.index(c) for c in chosen]
    expected = torch.softmax(logits[:, keep], dim=1)
    assert out.contributor_ids == chosen
    assert_close(out.attribution_last, expected, atol=1e-5)
    assert_close(out.attribution_mean, expected, atol=1e-5)  # one step: the same weights


def test_bad_requests(sampler):
    with pytest.raises(UnknownContributorError, match="zed"):
        sampler(["a", "zed"], n=1, steps=1)
    with pytest.raises(ValueError, match="empty"):
        sampler([], n=1, steps=1)
    with pytest.raises(ValueError, match="scheduler='euler'"):
        sampler(None, n=1, steps=1, scheduler="euler")
    with pytest.raises(ValueError, match="mode='avg'"):
        sampler(None, n=1, steps=1, mode="avg")
    with pytest.raises(ValueError, match="n must be >= 1"):
        sampler(None, n=0, steps=1)


@pytest.mark.parametrize("scheduler", ["ddpm", "dpmpp-2m", "unipc"])
def test_a_request_joining_a_running_batch_gets_its_own_images(sampler, scheduler):
    """Continuous batching: requests join between steps, each row at its own timestep
    (a multistep solver keeps each request's own history of eps)."""
    from shards.sampler import SampleRequest

    first, second = SampleRequest(None, 3, 1), SampleRequest(("a", "b"), 2, 7)
    alone = [sampler.sample_batch([r], steps=6, scheduler=scheduler)[0] for r in (first, second)]
    batch = sampler.batch(steps=6, scheduler=scheduler)
    batch.add(first, handle="first")
    done = {}
    for step in range(12):
        if step == 2:
            batch.add(second, handle="second")  # joins at the first request's third step
        done.update(dict(batch.step()))
        if not batch.rows:
            break
    assert step == 7 and set(done) == {"first", "second"}
    for out, ref in zip([done["first"], done["second"]], alone, strict=True):
        assert out.contributor_ids == ref.contributor_ids
        assert_close(out.images, ref.images)
        assert_close(out.attribution_mean, ref.attribution_mean)
        assert_close(out.attribution_last, ref.attribution_last)


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpmpp-2m-sde"])
def test_requests_of_different_step_counts_share_a_batch(sampler, scheduler):
    """A 2-step request runs beside a 9-step one (the service batches them together):
    each gets the images it gets alone, on its own schedule."""
    from shards.sampler import SampleRequest

    long, short = SampleRequest(None, 2, 3, steps=9), SampleRequest(("a", "c"), 1, 5, steps=2)
    alone = [sampler.sample_batch([SampleRequest(r.contributors, r.n, r.seed)], steps=r.steps,
                                  scheduler=scheduler)[0] for r in (long, short)]
    batch = sampler.batch(steps=50, scheduler=scheduler)  # the default, used by neither
    batch.add(long, handle="long")
    done, finished_at = {}, {}
    for step in range(20):
        if step == 3:
            batch.add(short, handle="short")
            assert batch.remaining == 2 * 6 + 1 * 2
        for handle, out in batch.step():
            done[handle], finished_at[handle] = out, step
        if not batch.rows:
            break
    assert finished_at == {"short": 4, "long": 8}
    for out, ref in zip([done["long"], done["short"]], alone, strict=True):
        assert out.contributor_ids == ref.contributor_ids
        assert_close(out.images, ref.images)
        assert_close(out.attribution_mean, ref.attribution_mean)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        batch.add(SampleRequest(None, 1, 0, steps=0))
