"""Matryoshka Hypencoders: loading the released format with the reference semantics (no residuals, layer norm over
the cut width), parity at every width in fp32 and fp64, truncation of q-nets, refusals, and save/load."""
import json
import os
import shutil

import pytest
import torch
from helpers import qnet_fp32_bound

from pyterrier_hypencoder import CheckpointError, Hypencoder, QNets, QNetSpec

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def expected(parity_dir):
    if not (parity_dir / 'expected_matryoshka.json').exists():
        pytest.skip(f'the Matryoshka parity fixture is not in {parity_dir}')
    return json.loads((parity_dir / 'expected_matryoshka.json').read_text())


@pytest.fixture(scope='module')
def matryoshka(parity_dir, expected):
    return Hypencoder.from_pretrained(parity_dir / 'tiny_matryoshka', device='cpu')


def _scores(model, expected, width):
    return model.encode_queries(expected['queries']).truncate(width).score(model.encode_docs(expected['docs']))


# ---- loading and parity -------------------------------------------------------------------------------------------

def test_matryoshka_checkpoint_is_recognised(matryoshka, expected):
    assert matryoshka.matryoshka_widths == tuple(expected['widths']) == (8, 16, 32)
    assert not matryoshka.spec.residual and not matryoshka.spec.residual_on_last


@pytest.mark.parametrize('width', [8, 16, 32])
def test_parity_fp32_at_every_width(matryoshka, expected, width):
    reference = torch.tensor(expected['scores_fp64'][str(width)], dtype=torch.float64)
    qnets = matryoshka.encode_queries(expected['queries']).truncate(width)
    docs = matryoshka.encode_docs(expected['docs'])
    bound = min(qnet_fp32_bound(qnets.spec, reference), 2e-4 * float(reference.abs().max()))
    assert (qnets.score(docs).double() - reference).abs().max() <= bound
    pairs = qnets.score_pairs(docs.expand(len(qnets), -1, -1))
    assert (pairs.double() - reference).abs().max() <= bound


@pytest.mark.parametrize('width', [8, 16, 32])
def test_parity_fp64_at_every_width(parity_dir, expected, width):
    model = Hypencoder.from_pretrained(parity_dir / 'tiny_matryoshka', device='cpu', dtype='fp64')
    reference = torch.tensor(expected['scores_fp64'][str(width)], dtype=torch.float64)
    assert (_scores(model, expected, width) - reference).abs().max() < 1e-9
    qnets = model.encode_queries(expected['queries']).truncate(width)
    docs = model.encode_docs(expected['docs'])
    with torch.enable_grad():  # the autograd path (training) scores the same
        differentiable = qnets.score(docs.clone().requires_grad_(True))
    assert (differentiable.detach() - reference).abs().max() < 1e-9


def test_full_width_is_the_uncut_qnet(matryoshka, expected):
    qnets = matryoshka.encode_queries(expected['queries'])
    assert qnets.truncate(32) is qnets
    docs = matryoshka.encode_docs(expected['docs'])
    reference = torch.tensor(expected['scores_full_converter_fp64'], dtype=torch.float64)
    assert (qnets.score(docs).double() - reference).abs().max() <= qnet_fp32_bound(qnets.spec, reference)


# ---- truncation ---------------------------------------------------------------------------------------------------

def test_truncation_is_views_of_the_generated_tensors(matryoshka, expected):
    qnets = matryoshka.encode_queries(expected['queries'])
    cut = qnets.truncate(8)
    assert cut.spec.vector_dimensions == (32, 8, 8, 1) and cut.spec.widths == (8,) and cut.spec.width == 8
    assert [tuple(w.shape) for w in cut.weights] == [(3, 32, 8), (3, 8, 8), (3, 8, 1)]
    assert [tuple(b.shape) for b in cut.biases] == [(3, 8), (3, 8)]
    for small, full in zip(cut.weights + cut.biases, qnets.weights + qnets.biases):
        assert small.untyped_storage().data_ptr() == full.untyped_storage().data_ptr()
    assert torch.equal(cut.weights[1], qnets.weights[1][:, :8, :8])
    # a cut q-net can be cut further, to the widths below its own, and to those only
    assert torch.equal(qnets.truncate(16).truncate(8).score(torch.ones(2, 32)), cut.score(torch.ones(2, 32)))
    with pytest.raises(ValueError, match=r'\[8\]'):
        cut.truncate(16)
    # queries selected after the cut are the cut q-nets of those queries
    assert torch.equal(cut[1].score(torch.ones(2, 32)), qnets[1].truncate(8).score(torch.ones(2, 32)))


@pytest.mark.parametrize('width', [12, 64, 0, True, '8'])
def test_other_widths_are_refused_naming_the_allowed_ones(matryoshka, width):
    qnets = matryoshka.encode_queries(['a query'])
    with pytest.raises(ValueError, match=r'\[8, 16, 32\]'):
        qnets.truncate(width)


def test_original_checkpoint_has_no_widths_and_refuses_truncation(parity_dir):
    model = Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu')
    assert model.matryoshka_widths == ()
    assert model.spec.residual  # the original q-net keeps its residuals
    qnets = model.encode_queries(['a query'])
    for width in (16, 32):
        with pytest.raises(ValueError, match='not trained nested'):
            qnets.truncate(width)


# ---- residuals under truncation (trained here with either setting) ----------------------------------------------

def _reference_forward(weights, biases, x, residual):
    """A width-cut q-net written out: every vector added to a width-w activation is cut to its first w entries."""
    h = x
    for j, (w, b) in enumerate(zip(weights[:-1], biases)):
        y = torch.nn.functional.layer_norm(torch.relu(h @ w + b), (w.shape[-1],), eps=1e-5)
        if residual and j < len(biases) - 1:
            y = y + h[..., :w.shape[-1]]
        h = y
    return (h @ weights[-1]).squeeze(-1)


@pytest.mark.parametrize('residual', [True, False])
def test_truncated_qnets_with_and_without_residuals(residual):
    g = torch.Generator().manual_seed(0)
    dims = (16, 16, 16, 16, 1)
    spec = QNetSpec(dims, residual=residual, widths=(4, 8))
    assert spec.widths == (4, 8, 16)
    weights = [torch.randn(3, a, b, generator=g, dtype=torch.float64) for a, b in spec.weight_shapes]
    biases = [torch.randn(3, b, generator=g, dtype=torch.float64) for b in spec.bias_dims]
    qnets = QNets(weights, biases, spec)
    docs = torch.randn(5, 16, generator=g, dtype=torch.float64)
    for width in spec.widths:
        cut = qnets.truncate(width)
        mats = [weights[0][:, :, :width]] + [m[:, :width, :width] for m in weights[1:-1]] + [weights[-1][:, :width]]
        expected = torch.stack([_reference_forward([m[i] for m in mats], [b[i, :width] for b in biases], docs, residual)
                                for i in range(3)])
        assert (cut.score(docs) - expected).abs().max() < 1e-12, width
        assert (cut.score_pairs(docs.expand(3, -1, -1)) - expected).abs().max() < 1e-12, width
        with torch.enable_grad():
            assert (cut.score(docs.clone().requires_grad_(True)).detach() - expected).abs().max() < 1e-12, width
    with_widths, without = QNets(weights, biases, spec), QNets(weights, biases, QNetSpec(dims, residual=residual))
    assert torch.equal(with_widths.score(docs), without.score(docs))  # widths change nothing at the full width


def test_spec_widths_validation():
    assert QNetSpec((32, 32, 1), widths=[16, 8, 16]).widths == (8, 16, 32)
    assert QNetSpec((32, 32, 1)).widths == ()
    assert 'widths' not in QNetSpec((32, 32, 1)).to_dict()
    nested = QNetSpec((32, 32, 32, 1), residual=False, widths=(8,))
    assert QNetSpec(**json.loads(json.dumps(nested.to_dict()))) == nested
    with pytest.raises(ValueError, match='exceeds'):
        QNetSpec((32, 32, 1), widths=(64,))
    with pytest.raises(ValueError, match='one hidden width'):
        QNetSpec((32, 32, 16, 1), residual=False, widths=(8,))
    with pytest.raises(ValueError, match='hidden block'):
        QNetSpec((32, 1), widths=(8,))
    with pytest.raises(ValueError, match='>= 1'):
        QNetSpec((32, 32, 1), widths=(0,))
    # a narrower residual block is nested q-nets' cut input, and nothing else's
    assert QNetSpec((32, 16, 16, 1), widths=(16,)).residual
    with pytest.raises(ValueError, match='residual'):
        QNetSpec((32, 16, 16, 1))


# ---- save / load, and configs that cannot be scored exactly --------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path, matryoshka, expected):
    matryoshka.save_pretrained(tmp_path / 'saved')
    meta = json.loads((tmp_path / 'saved' / 'config.json').read_text())['pyterrier-hypencoder']
    assert meta['qnet']['widths'] == [8, 16, 32] and meta['qnet']['residual'] is False and meta['format_version'] == 2
    reloaded = Hypencoder.from_pretrained(tmp_path / 'saved', device='cpu')
    assert reloaded.matryoshka_widths == (8, 16, 32) and reloaded.spec == matryoshka.spec
    for width in (8, 16, 32):
        assert torch.equal(_scores(reloaded, expected, width), _scores(matryoshka, expected, width))


def test_original_models_still_save_as_format_1(tmp_path, parity_dir):
    Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu').save_pretrained(tmp_path / 'saved')
    meta = json.loads((tmp_path / 'saved' / 'config.json').read_text())['pyterrier-hypencoder']
    assert meta['format_version'] == 1 and 'widths' not in meta['qnet']
    assert Hypencoder.from_pretrained(tmp_path / 'saved', device='cpu').matryoshka_widths == ()


def _variant(parity_dir, tmp_path, edit):
    """tiny_matryoshka with an edited config.json (the other files linked, not copied)."""
    source = parity_dir / 'tiny_matryoshka'
    folder = tmp_path / 'variant'
    folder.mkdir()
    for item in source.iterdir():
        if item.name != 'config.json':
            os.symlink(item, folder / item.name)
    config = json.loads((source / 'config.json').read_text())
    edit(config)
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize('edit, message', [
    (lambda c: c.update(loss_type=['matryoshka_dim_margin_mse', 'listwise_kl']), 'listwise_kl'),
    (lambda c: c['query_encoder_kwargs']['converter_kwargs'].update(do_residual_on_last=True), 'do_residual_on_last'),
    (lambda c: c['query_encoder_kwargs']['converter_kwargs'].pop('do_residual_on_last'), 'do_residual_on_last'),
    (lambda c: c['query_encoder_kwargs']['converter_kwargs'].update(layer_norm_before_residual=False), 'layer norm'),
    (lambda c: c.update(loss_kwargs=[{'matryoshka_dims': [8, 64]}]), 'exceeds'),
    (lambda c: c.update(loss_kwargs=[{}]), 'matryoshka_dims'),
])
def test_configs_that_cannot_be_scored_exactly_are_refused(parity_dir, expected, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        Hypencoder.from_pretrained(_variant(parity_dir, tmp_path, edit), device='cpu')


def test_matryoshka_without_residual_flags_and_widths_without_full(parity_dir, expected, tmp_path):
    """``do_residual: false`` says the same as the released config; widths that omit the full one still list it."""
    def edit(config):
        config['query_encoder_kwargs']['converter_kwargs'].update(do_residual=False)
        config['query_encoder_kwargs']['converter_kwargs'].pop('do_residual_on_last')
        config['loss_kwargs'] = [{'matryoshka_dims': [16, 8]}]
    model = Hypencoder.from_pretrained(_variant(parity_dir, tmp_path, edit), device='cpu')
    assert model.matryoshka_widths == (8, 16, 32)
    reference = torch.tensor(expected['scores_fp64']['16'], dtype=torch.float64)
    assert (_scores(model, expected, 16).double() - reference).abs().max() < 2e-4 * float(reference.abs().max())


def test_unknown_loss_in_an_original_checkpoint_is_refused(parity_dir, tmp_path):
    source = parity_dir / 'tiny_official'
    folder = tmp_path / 'official'
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns('*.bin'))
    os.symlink(source / 'pytorch_model.bin', folder / 'pytorch_model.bin')
    config = json.loads((source / 'config.json').read_text())
    config['loss_type'] = ['margin_mse', 'matryoshka_something_new']
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='matryoshka_something_new'):
        Hypencoder.from_pretrained(folder, device='cpu')


def test_from_backbone_residual_default(tiny_bert):
    assert Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, device='cpu').spec.residual
    nested = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, matryoshka_widths=(8, 16), device='cpu')
    assert nested.matryoshka_widths == (8, 16, 32) and not nested.spec.residual
    both = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, matryoshka_widths=(8,), qnet_residual=True,
                                    device='cpu')
    assert both.spec.residual and both.matryoshka_widths == (8, 32)
    qnets = both.encode_queries(['a query'])
    assert qnets.truncate(8).score(both.encode_docs(['a document'])).shape == (1, 1)
