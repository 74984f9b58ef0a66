"""Warm starts: a Hypencoder that begins as a trained BE-Base ranks exactly as it does; one that begins at a
backbone's similarity (``warm_start_hypencoder``)."""
import numpy as np
import pytest
import torch
from helpers import fruit_config, fruit_frame, losses_of

from pyterrier_hypencoder.train import DotEncoder, TrainConfig, Trainer, warm_start_from_dot

QUERIES = ['apple fruit', 'a tree with yellow fruit', 'what grows on olive trees', 'plum jam recipe']


DOCS = [f'a text about the {w} tree and its fruit' for w in 'apple banana cherry grape lemon mango olive peach'.split()]


def _trained_like_dot(tiny_bert, dtype, doc_norm=False):
    dot = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', normalize=False, query_norm=True, doc_norm=doc_norm,
                                   device='cpu', dtype=dtype)
    with torch.no_grad():  # a projection far from the identity, as training leaves it
        g = torch.Generator().manual_seed(0)
        dot.query_projection.weight.copy_(torch.randn(dot.dim, dot.dim, generator=g).to(dot.dtype) / dot.dim ** 0.5)
    return dot


@pytest.mark.parametrize('doc_norm', [False, True])
@pytest.mark.parametrize('qnet_layers', [2, 4])
def test_warm_start_from_dot_scores_exactly_as_be_base(tiny_bert, qnet_layers, doc_norm):
    """In float64 the two models' scores agree to 1e-9 of their size (measured: 2.5e-15 on an Intel Xeon with
    AVX-512, a margin of 10^5), so the rankings are the same; the construction is exact, not an approximation."""
    dot = _trained_like_dot(tiny_bert, 'fp64', doc_norm)
    model = warm_start_from_dot(dot, qnet_layers=qnet_layers, dtype='fp64')
    want = dot.encode_queries(QUERIES) @ dot.encode_docs(DOCS).T
    got = model.encode_queries(QUERIES).score(model.encode_docs(DOCS))
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
    assert torch.equal(got.argsort(dim=1, descending=True), want.argsort(dim=1, descending=True))


@pytest.mark.parametrize('doc_norm', [False, True])
def test_warm_start_from_dot_in_fp32_keeps_the_ranking(tiny_bert, doc_norm):
    dot = _trained_like_dot(tiny_bert, None, doc_norm)
    model = warm_start_from_dot(dot, qnet_layers=2)
    want = (dot.encode_queries(QUERIES) @ dot.encode_docs(DOCS).T).double()
    got = model.encode_queries(QUERIES).score(model.encode_docs(DOCS)).double()
    # fp32 rounding of the shifted mean (shift ~4x the largest state) stays far below the score gaps here:
    # measured 1.9e-6 of the largest score on an Intel Xeon (AVX-512) against the bound 1e-4 (50x margin); the
    # smallest gap between two documents' scores is 3e-3, over 100x the largest difference
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    gaps = want.sort(dim=1).values.diff(dim=1).min()
    assert gaps > 100 * (got - want).abs().max()
    assert torch.equal(got.argsort(dim=1), want.argsort(dim=1))


@pytest.mark.parametrize('doc_norm', [False, True])
def test_warm_start_from_dot_trains(tiny_bert, doc_norm):
    import pandas as pd
    rows = [{'qid': f'q{i}', 'query': q, 'docno': f'd{j}', 'text': d, 'label': int(i == j)}
            for i, q in enumerate(QUERIES) for j, d in enumerate(DOCS)]
    model = warm_start_from_dot(_trained_like_dot(tiny_bert, None, doc_norm), qnet_layers=2)
    before = {k: v.clone() for k, v in model.hyperhead.state_dict().items()}
    Trainer(model, pd.DataFrame(rows), TrainConfig(steps=3, batch_size=2, num_negatives=3, warmup_steps=0,
                                                   log_every=1, lr=1e-3), verbose=False).train()
    changed = [k for k, v in model.hyperhead.state_dict().items() if not torch.equal(v, before[k])]
    # gradients reach the hidden blocks too (their ReLUs start open), not only the final matrix
    assert any('weight_hyper_projection.0' in k for k in changed)
    assert any(k.startswith('hyper_base_matrices.0') for k in changed)


def test_warm_start_from_dot_rejects_what_a_qnet_cannot_express(tiny_bert):
    cosine = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', normalize=True, device='cpu')
    with pytest.raises(ValueError, match=r"normalize=True \(needs False\), query_norm=False \(needs True\)"):
        warm_start_from_dot(cosine)
    cls = DotEncoder.from_backbone(str(tiny_bert), pooling='cls', query_norm=True, device='cpu')
    with pytest.raises(ValueError, match=r"pooling='cls' \(needs 'mean'\)"):
        warm_start_from_dot(cls)
    with pytest.raises(ValueError, match='qnet_layers >= 2'):
        warm_start_from_dot(_trained_like_dot(tiny_bert, None), qnet_layers=1)
    with pytest.raises(TypeError, match='must be a DotEncoder'):
        warm_start_from_dot('model')
    with pytest.raises(ValueError, match='choose one of them'):
        DotEncoder.from_backbone(str(tiny_bert), pooling='mean', normalize=True, doc_norm=True, device='cpu')


def test_doc_norm_standardises_documents(tiny_bert):
    plain = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', query_norm=True, device='cpu', dtype='fp64')
    normed = _trained_like_dot(tiny_bert, 'fp64', doc_norm=True)
    docs, raw = normed.encode_docs(DOCS), plain.encode_docs(DOCS)
    want = (raw - raw.mean(dim=1, keepdim=True)) / (raw.var(dim=1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert (docs - want).abs().max() <= 1e-12 * want.abs().max()


def test_query_and_doc_norm_round_trip(tiny_bert, tmp_path):
    dot = _trained_like_dot(tiny_bert, None, doc_norm=True)
    dot.save_pretrained(tmp_path / 'dot')
    loaded = DotEncoder.from_pretrained(tmp_path / 'dot', device='cpu')
    assert loaded.query_norm and loaded.doc_norm and 'query_norm=True, doc_norm=True' in repr(loaded)
    np.testing.assert_array_equal(loaded.encode_docs(DOCS).numpy(), dot.encode_docs(DOCS).numpy())
    np.testing.assert_array_equal(loaded.encode_queries(QUERIES).numpy(), dot.encode_queries(QUERIES).numpy())


def test_standardised_be_base_trains_on_a_cosine_logit_scale(tiny_bert):
    import pandas as pd
    rows = [{'qid': f'q{i}', 'query': q, 'docno': f'd{j}', 'text': d, 'label': int(i == j)}
            for i, q in enumerate(QUERIES) for j, d in enumerate(DOCS)]
    config = TrainConfig(steps=1, batch_size=2, num_negatives=3, warmup_steps=0)
    normed = _trained_like_dot(tiny_bert, None, doc_norm=True)
    # its scores are dim times a correlation: the temperature puts them on a cosine's scale at 0.05
    assert Trainer(normed, pd.DataFrame(rows), config, verbose=False).temperature == 0.05 * normed.dim
    plain = _trained_like_dot(tiny_bert, None)
    assert Trainer(plain, pd.DataFrame(rows), config, verbose=False).temperature == 1.0


def test_hidden_lr_scale_slows_only_the_hidden_block_generators(tiny_bert):
    import pandas as pd
    rows = [{'qid': f'q{i}', 'query': q, 'docno': f'd{j}', 'text': d, 'label': int(i == j)}
            for i, q in enumerate(QUERIES) for j, d in enumerate(DOCS)]
    model = warm_start_from_dot(_trained_like_dot(tiny_bert, None, doc_norm=True), qnet_layers=2)
    head = model.hyperhead
    trainer = Trainer(model, pd.DataFrame(rows), TrainConfig(steps=1, batch_size=2, num_negatives=3, lr=1e-3,
                                                             hidden_lr_scale=0.01), verbose=False)
    final, hidden = trainer._trainable()
    assert final['lr'] == 1e-3 and hidden['lr'] == 1e-3 * 0.01
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(final['params']) == ids(head.final_parameters())
    assert ids(final['params']) | ids(hidden['params']) == ids(head.parameters())
    assert id(head.weight_hyper_projection[1].weight) in ids(final['params'])
    assert id(head.weight_hyper_projection[0].weight) in ids(hidden['params'])
    assert id(head.hyper_base_vectors[0]) in ids(hidden['params'])
    for bad in (0, -1.0, None):
        with pytest.raises(ValueError, match='hidden_lr_scale must be a number > 0'):
            TrainConfig(hidden_lr_scale=bad)


@pytest.mark.parametrize('doc_norm', [False, True])
def test_warm_start_from_dot_carries_its_temperature(tiny_bert, tmp_path, doc_norm):
    import pandas as pd

    from pyterrier_hypencoder import Hypencoder
    dot = _trained_like_dot(tiny_bert, None, doc_norm)
    model = warm_start_from_dot(dot, qnet_layers=2)
    want = 0.05 * dot.dim if doc_norm else 1.0
    rows = [{'qid': f'q{i}', 'query': q, 'docno': f'd{j}', 'text': d, 'label': int(i == j)}
            for i, q in enumerate(QUERIES) for j, d in enumerate(DOCS)]
    config = TrainConfig(steps=1, batch_size=2, num_negatives=3, warmup_steps=0)
    # The trainer takes BE-Base's own temperature with no argument, and so does a reloaded copy of the model.
    assert Trainer(dot, pd.DataFrame(rows), config, verbose=False).temperature == pytest.approx(want)
    assert Trainer(model, pd.DataFrame(rows), config, verbose=False).temperature == pytest.approx(want)
    model.save_pretrained(tmp_path / 'm')
    again = Hypencoder.from_pretrained(tmp_path / 'm', device='cpu')
    assert again.train_temperature == pytest.approx(want)
    assert Trainer(again, pd.DataFrame(rows), config, verbose=False).temperature == pytest.approx(want)
    # An explicit temperature still wins.
    assert Trainer(model, pd.DataFrame(rows), TrainConfig(steps=1, batch_size=2, num_negatives=3, warmup_steps=0,
                                                          temperature=0.5), verbose=False).temperature == 0.5


# ---- warm_start_hypencoder ----------------------------------------------------------------------------------------------

# Last in the module: one torch thread for this test only (a module fixture, held to the module's end), as in the
# training tests it came from.
@pytest.mark.usefixtures('one_thread')
@pytest.mark.parametrize('start', ['standardised', 'cosine'])
def test_warm_start_begins_at_the_backbone_similarity(tiny_bert, start):
    from pyterrier_hypencoder.train import warm_start_hypencoder
    model = warm_start_hypencoder(str(tiny_bert), qnet_layers=3, temperature=0.05, start=start, device='cpu')
    assert model.spec.residual_on_last == (start == 'cosine') and model.pooling == 'mean'
    queries, docs = ['apple fruit', 'plum tree tall'], ['a text about the apple tree', 'the plum', 'x y z w']
    enc = model.tokenize(queries, 64)
    with torch.no_grad():
        states = model.backbone(**enc).last_hidden_state
    mask = enc['attention_mask'].unsqueeze(-1).float()
    mean = (states * mask).sum(1) / mask.sum(1)

    def standardise(v):
        return (v - v.mean(1, keepdim=True)) / v.std(1, unbiased=False, keepdim=True)
    vectors = model.encode_docs(docs)
    # first block: the standardised document (plus the raw one through the residual, in the cosine start); final
    # matrix: the standardised mean query state / (t * dim)
    carried = standardise(vectors) + (vectors if start == 'cosine' else 0)
    expected = standardise(mean) @ carried.T / (0.05 * model.dim)
    assert torch.allclose(model.encode_queries(queries).score(vectors), expected, rtol=1e-3, atol=1e-3)
    # and it trains like any Hypencoder
    trainer = Trainer(model, fruit_frame(), fruit_config(steps=5), verbose=False)
    trainer.train()
    assert len(losses_of(trainer)) == 5
    with pytest.raises(ValueError, match='qnet_layers >= 2'):
        warm_start_hypencoder(str(tiny_bert), qnet_layers=1)
