import torch

from shards.classifier import ShardClassifier, expand_classifier, mixture_weights


def closed_form(logits, log_prior, log_freq, subset):
    """Eq. (1): lambda_i p_i / sum_{j in S} lambda_j p_j, with p_i = softmax(f)_i / pi_i
    (the classifier's posterior with its training prior divided out)."""
    post = torch.softmax(logits, -1)
    unnorm = log_prior.exp() * post / log_freq.exp()
    unnorm = unnorm * subset.float()
    return unnorm / unnorm.sum(-1, keepdim=True)


def test_masked_softmax_equals_closed_form_for_every_subset():
    g = torch.Generator().manual_seed(0)
    n = 5
    logits = torch.randn(7, n, generator=g) * 3
    log_prior = torch.log(torch.tensor([10.0, 200.0, 35.0, 1.0, 80.0]))
    log_freq = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.15, 0.25]))
    for mask_bits in range(1, 2**n):
        subset = torch.tensor([(mask_bits >> i) & 1 == 1 for i in range(n)])
        w = mixture_weights(logits, log_prior, log_freq, subset)
        expected = closed_form(logits, log_prior, log_freq, subset)
        assert torch.allclose(w, expected, atol=1e-6), mask_bits
        assert torch.all(w[:, ~subset] == 0)
        assert torch.allclose(w.sum(-1), torch.ones(7))


def test_empty_subset_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="empty"):
        mixture_weights(torch.zeros(1, 2), torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool))


def test_classifier_save_load_round_trip(tmp_path):
    clf = ShardClassifier(contributor_ids=["a", "b", "c"], train_frequencies=[0.2, 0.3, 0.5])
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").exists()
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    again = ShardClassifier.from_pretrained(tmp_path)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    assert torch.equal(clf(x, t), again(x, t))
    assert again.config.contributor_ids == ["a", "b", "c"]
    assert torch.allclose(again.log_train_freq.exp(), torch.tensor([0.2, 0.3, 0.5]))


def test_expand_classifier_keeps_old_logits():
    old = ShardClassifier(contributor_ids=["a", "c"])
    new = expand_classifier(old, ["a", "b", "c"])
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        lo, ln = old(x, t), new(x, t)
    assert torch.allclose(ln[:, [0, 2]], lo, atol=1e-6)
    assert torch.all(ln[:, 1] == 0)
