"""The Hypencoder model: parity with the reference implementation, save/load, from_backbone, text checks."""
import pytest
import torch
from helpers import PARITY_ATOL, qnet_fp32_bound

from pyterrier_hypencoder import Hypencoder

# ---- parity with the reference code -------------------------------------------------------------------------------------

def test_parity_fp32(parity_model, parity_expected):
    scores = parity_model.encode_queries(parity_expected['queries']).score(parity_model.encode_docs(parity_expected['docs']))
    assert torch.allclose(scores, torch.tensor(parity_expected['scores_fp64'], dtype=torch.float32), atol=PARITY_ATOL, rtol=0)


def test_doc_vectors_are_cls(parity_model, parity_expected):
    docs = parity_model.encode_docs(parity_expected['docs'])
    assert torch.allclose(docs, torch.tensor(parity_expected['doc_embeddings_fp64'], dtype=torch.float32), atol=1e-5)


def test_parity_fp64_exact(parity_dir, parity_expected):
    model = Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu', dtype='fp64')
    qnets = model.encode_queries(parity_expected['queries'])
    scores = qnets.score(model.encode_docs(parity_expected['docs']))
    assert (scores - torch.tensor(parity_expected['scores_fp64'], dtype=torch.float64)).abs().max() < 1e-9
    ref = parity_expected['q_net_query0_fp64']
    for k, m in enumerate(ref['matrices']):
        assert torch.allclose(qnets.weights[k][0], torch.tensor(m, dtype=torch.float64), atol=1e-9)
    for k, b in enumerate(ref['biases']):
        assert torch.allclose(qnets.biases[k][0], torch.tensor(b, dtype=torch.float64).flatten(), atol=1e-9)


def test_parity_truncation(parity_dir, parity_expected):
    case = parity_expected['truncation_case']
    model = Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu',
                                       query_max_length=case['query_max_length'], doc_max_length=case['doc_max_length'])
    assert model.tokenize(parity_expected['queries'], model.query_max_length)['input_ids'].tolist() == case['query_input_ids']
    scores = model.encode_queries(parity_expected['queries']).score(model.encode_docs(parity_expected['docs']))
    assert torch.allclose(scores, torch.tensor(case['scores_fp64'], dtype=torch.float32), atol=PARITY_ATOL, rtol=0)


def test_query_alone_equals_query_in_padded_batch(parity_model, parity_expected):
    """A query encoded alone and inside a padded batch gets the same scores, up to fp32 rounding.

    Both are compared with the reference code's float64 scores under :func:`helpers.qnet_fp32_bound` (3.7e-3 for
    these q-nets); measured on an Intel Xeon (AVX-512): at most 1.2e-5 off, a margin of 300x.
    """
    docs = parity_model.encode_docs(parity_expected['docs'])
    reference = torch.tensor(parity_expected['scores_fp64'], dtype=torch.float64)
    bound = qnet_fp32_bound(parity_model.spec, reference)
    batch = parity_model.encode_queries(parity_expected['queries']).score(docs)
    assert (batch.double() - reference).abs().max() <= bound
    for i, q in enumerate(parity_expected['queries']):
        alone = parity_model.encode_queries([q]).score(docs)[0]
        assert (alone.double() - reference[i]).abs().max() <= bound


def test_tokenisation_matches_reference(parity_model, parity_expected):
    enc = parity_model.tokenize(parity_expected['queries'], parity_model.query_max_length)
    assert enc['input_ids'].tolist() == parity_expected['query_input_ids']
    assert enc['attention_mask'].tolist() == parity_expected['query_attention_mask']
    assert parity_model.tokenize(parity_expected['docs'], parity_model.doc_max_length)['input_ids'].tolist() == \
        parity_expected['doc_input_ids']


def test_low_precision_dtypes_track_fp32(parity_dir, parity_model, parity_expected):
    ref = parity_model.encode_queries(parity_expected['queries']).score(parity_model.encode_docs(parity_expected['docs']))
    for dtype in ('bf16', 'fp16'):
        model = Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu', dtype=dtype)
        assert model.dtype == {'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype]
        scores = model.encode_queries(parity_expected['queries']).score(model.encode_docs(parity_expected['docs']))
        assert scores.dtype == model.dtype
        assert (scores.float() - ref).abs().max() < 0.5  # bf16 keeps ~3 significant digits on scores of size ~7
        assert (scores.float().argsort(dim=1) == ref.argsort(dim=1)).float().mean() > 0.7


def test_encode_docs_keeps_input_order(parity_model, parity_expected):
    docs = parity_expected['docs']
    together = parity_model.encode_docs(docs, batch_size=2)
    for i, d in enumerate(docs):
        assert torch.allclose(parity_model.encode_docs([d])[0], together[i], atol=1e-5)


# ---- save / load, from_backbone -----------------------------------------------------------------------------------------

def test_save_pretrained_round_trip(tmp_path, parity_model, parity_expected):
    parity_model.save_pretrained(tmp_path / 'saved')
    assert (tmp_path / 'saved' / 'model.safetensors').exists()
    reloaded = Hypencoder.from_pretrained(tmp_path / 'saved', device='cpu')
    docs = parity_expected['docs']
    a = parity_model.encode_queries(parity_expected['queries']).score(parity_model.encode_docs(docs))
    b = reloaded.encode_queries(parity_expected['queries']).score(reloaded.encode_docs(docs))
    assert torch.equal(a, b)
    assert reloaded.spec == parity_model.spec


def test_from_backbone_tiny_bert(tiny_bert, tmp_path):
    model = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=4, device='cpu', seed=3)
    assert model.spec.vector_dimensions == (32, 32, 32, 32, 1)
    qnets = model.encode_queries(['a query', 'another longer query here'])
    docs = model.encode_docs(['doc one', 'doc two is longer', 'three'])
    scores = qnets.score(docs)
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()
    again = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=4, device='cpu', seed=3)
    assert torch.allclose(again.encode_queries(['a query']).score(docs), qnets[0].score(docs), atol=1e-5)
    mean = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, pooling='mean', device='cpu')
    assert not torch.allclose(mean.encode_docs(['doc one']), model.encode_docs(['doc one']))
    mean.save_pretrained(tmp_path / 'm')
    assert Hypencoder.from_pretrained(tmp_path / 'm', device='cpu').pooling == 'mean'


def test_texts_must_be_strings(parity_model):
    with pytest.raises(TypeError, match='single string'):
        parity_model.encode_docs('just one string')
    with pytest.raises(TypeError, match='not str'):
        parity_model.encode_queries(['ok', 3])
