"""The default warm start ranks documents by direction only: rescaling a document vector changes nothing at step 0."""
import pytest
import torch

from pyterrier_hypencoder.train import warm_start_hypencoder

QUERIES = ['apple fruit', 'a tree with yellow fruit', 'what grows on olive trees', 'plum jam recipe']
DOCS = [f'a text about the {w} tree and its fruit' for w in 'apple banana cherry grape lemon mango olive peach'.split()]


def _scores(model, factors=None):
    vectors = model.encode_docs(DOCS).double()
    if factors is not None:
        vectors = vectors * factors[:, None]
    qnets = model.encode_queries(QUERIES).to(dtype=torch.float64)
    return qnets.score(vectors)


@pytest.mark.parametrize('qnet_layers', [2, 4])
def test_default_start_is_invariant_to_rescaled_documents(tiny_bert, qnet_layers):
    model = warm_start_hypencoder(str(tiny_bert), qnet_layers=qnet_layers, device='cpu')
    assert not model.spec.residual  # the default start carries no raw vector through a residual
    factors = torch.empty(len(DOCS), dtype=torch.float64).uniform_(0.25, 4, generator=torch.Generator().manual_seed(0))
    plain, rescaled = _scores(model), _scores(model, factors)
    assert torch.equal(plain.argsort(dim=1, descending=True), rescaled.argsort(dim=1, descending=True))
    # Exact but for the layer norm's eps (1e-5 added to a variance of about factor**2): within 1e-3 of the scores.
    assert (plain - rescaled).abs().max() <= 1e-3 * plain.abs().max()


def test_cosine_start_is_kept_and_does_rank_by_norm(tiny_bert):
    # The check above can fail: the earlier start, kept as an option, moves with the documents' norms.
    model = warm_start_hypencoder(str(tiny_bert), qnet_layers=2, start='cosine', device='cpu')
    assert model.spec.residual
    factors = torch.empty(len(DOCS), dtype=torch.float64).uniform_(0.25, 4, generator=torch.Generator().manual_seed(0))
    plain, rescaled = _scores(model), _scores(model, factors)
    assert (plain - rescaled).abs().max() > 0.05 * plain.abs().max()


def test_both_starts_rank_like_the_encoder(tiny_bert):
    # Same first block and final matrix: on these texts the two starts order each query's documents alike at the top.
    standardised = _scores(warm_start_hypencoder(str(tiny_bert), device='cpu'))
    cosine = _scores(warm_start_hypencoder(str(tiny_bert), start='cosine', device='cpu'))
    assert (standardised.argmax(dim=1) == cosine.argmax(dim=1)).float().mean() >= 0.5


def test_unknown_start_is_named(tiny_bert):
    with pytest.raises(ValueError, match="start must be one of"):
        warm_start_hypencoder(str(tiny_bert), start='dot')
