"""The principal-axes start of a Matryoshka head: an exact rotation at full width, the leading axes when cut."""
import numpy as np
import pytest
import torch

from pyterrier_hypencoder.train import DotEncoder, principal_rotation, warm_start_from_dot, warm_start_hypencoder
from pyterrier_hypencoder.train.principal_axes import helmert_basis

DIM = 32  # the tiny BERT's hidden size
QUERIES = ['apple fruit', 'a tree with yellow fruit', 'what grows on olive trees', 'plum jam recipe']
DOCS = [f'a text about the {w} tree and its fruit' for w in 'apple banana cherry grape lemon mango olive peach'.split()]


def _low_rank_docs(n=400, rank=4, dim=DIM, seed=0):
    """Document vectors that vary mostly in ``rank`` directions, with an offset and norms that differ."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(g.normal(size=(dim, dim)))[0][:, :rank]
    x = g.normal(size=(n, rank)) * np.linspace(4, 1, rank) @ basis.T + 0.05 * g.normal(size=(n, dim)) + 0.5
    return x * g.uniform(0.5, 2, size=(n, 1))


def _standardised(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    z = x - x.mean(dim=1, keepdim=True)
    return z / z.norm(dim=1, keepdim=True)


def test_rotation_is_orthogonal_fixes_ones_and_nests_the_leading_axes():
    x = _low_rank_docs()
    rotation = principal_rotation(x, DIM)
    eye, ones = torch.eye(DIM, dtype=torch.float64), torch.ones(DIM, dtype=torch.float64)
    assert torch.allclose(rotation @ rotation.T, eye, atol=1e-12)
    assert torch.allclose(rotation @ ones, ones, atol=1e-12)
    z = _standardised(x)
    z = z - z.mean(dim=0)
    _, vecs = torch.linalg.eigh(z.T @ z)
    for w in (2, 3, 8, 16, DIM):
        # a q-net cut to w units centres them (its layer norm): what is left sees exactly the w - 1 leading axes
        top = vecs[:, -(w - 1):]
        rows = rotation[:w] - rotation[:w].mean(dim=0)
        assert torch.allclose(rows.T @ rows, top @ top.T, atol=1e-10)
    # a layer norm (centre, scale) commutes with it: the full-width q-net is unchanged
    v = torch.as_tensor(x[:5])
    assert torch.allclose(_standardised(v @ rotation.T), _standardised(v) @ rotation.T, atol=1e-12)


def test_helmert_basis():
    basis = helmert_basis(6)
    assert torch.allclose(basis.T @ basis, torch.eye(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.sum(dim=0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.equal(basis[3:, 1], torch.zeros(3, dtype=torch.float64))  # column 1 lives on the first 3 units


@pytest.mark.parametrize('bad', [np.ones((1, DIM)), np.ones((5, DIM + 1)), np.full((3, DIM), np.nan),
                                 ['a text', 'another text']])
def test_rotation_names_bad_vectors(bad):
    with pytest.raises(ValueError, match='principal axes need'):
        principal_rotation(bad, DIM)


def _qnet_scores(model, docs, width=None):
    qnets = model.encode_queries(QUERIES).to(dtype=torch.float64)
    if width is not None:
        qnets = qnets.truncate(width)
    return qnets.score(torch.as_tensor(docs, dtype=torch.float64))


def test_full_width_scores_are_unchanged(tiny_bert):
    docs = _low_rank_docs()
    plain = warm_start_hypencoder(str(tiny_bert), qnet_layers=3, dtype='fp64', device='cpu')
    rotated = warm_start_hypencoder(str(tiny_bert), qnet_layers=3, principal_axes_of=docs, dtype='fp64', device='cpu')
    a, b = _qnet_scores(plain, docs[:50]), _qnet_scores(rotated, docs[:50])
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_cut_qnets_start_from_the_leading_axes(tiny_bert):
    # Documents that vary in 4 directions: cut to 8 units, the rotated start keeps the full width's ranking; the
    # plain start, cut to the encoder's first 8 coordinates, does not.
    docs = _low_rank_docs(seed=1)
    rank = {}
    for name, axes in (('plain', None), ('rotated', docs)):
        model = warm_start_hypencoder(str(tiny_bert), principal_axes_of=axes, dtype='fp64', device='cpu')
        model.set_matryoshka_widths([8, DIM])
        full, cut = _qnet_scores(model, docs), _qnet_scores(model, docs, width=8)
        top = full.topk(20, dim=1).indices
        rank[name] = np.mean([len(set(t.tolist()) & set(c.tolist())) / 20
                              for t, c in zip(top, cut.topk(20, dim=1).indices)])
    assert rank['rotated'] >= 0.8 and rank['rotated'] > rank['plain'] + 0.2, rank


def test_from_dot_stays_exactly_be_base(tiny_bert):
    docs = _low_rank_docs()
    dot = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', query_norm=True, doc_norm=True, device='cpu',
                                   dtype='fp64')
    with torch.no_grad():  # a query projection as training leaves it, so that the final matrix's rotation matters
        g = torch.Generator().manual_seed(0)
        dot.query_projection.weight.copy_(torch.randn(DIM, DIM, generator=g, dtype=torch.float64) / DIM ** 0.5)
    model = warm_start_from_dot(dot, qnet_layers=3, principal_axes_of=docs)
    vectors = torch.as_tensor(docs[:50], dtype=torch.float64)
    expected = dot.encode_queries(QUERIES).double() @ dot.finish_docs(vectors).T
    got = model.encode_queries(QUERIES).to(dtype=torch.float64).score(vectors)
    assert (got - expected).abs().max() <= 1e-8 * expected.abs().max()


def test_refused_where_a_rotation_would_change_the_scores(tiny_bert):
    docs = _low_rank_docs(n=10)
    with pytest.raises(ValueError, match="start='standardised'"):
        warm_start_hypencoder(str(tiny_bert), start='cosine', principal_axes_of=docs, device='cpu')
    dot = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', query_norm=True, device='cpu')
    with pytest.raises(ValueError, match='doc_norm=True'):
        warm_start_from_dot(dot, principal_axes_of=docs)
