"""The trainer: head-only and full training of Hypencoders, distillation, checkpoints, resume, the feature cache,
and bad options."""
import json

import numpy as np
import pytest
import torch
from helpers import FRUITS, fruit_config, fruit_dev, fruit_frame, fruit_hypencoder, losses_of

from pyterrier_hypencoder import Hypencoder
from pyterrier_hypencoder.train import TrainConfig, Trainer, TrainingGroups

pytestmark = pytest.mark.usefixtures('one_thread')


def test_head_only_hypencoder_learns_and_round_trips(tiny_bert, tmp_path):
    """Head-only training more than halves the loss; the best checkpoint reloads with equal weights.

    Loss ratio over training seeds 0-4 on an Intel Xeon (AVX-512): 0.02-0.18 (threshold 0.5, margin >= 2.7x).
    """
    model = fruit_hypencoder(tiny_bert)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = Trainer(model, fruit_frame(), fruit_config(), dev=fruit_dev(), output_dir=tmp_path / 'out', verbose=False)
    before = trainer.evaluate()
    trainer.train()
    losses = losses_of(trainer)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])
    assert trainer.evaluate() > before
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), f'head-only training changed the backbone ({k})'
    # the best checkpoint, loaded back, scores exactly like the trained model in memory
    queries = [f'{w} fruit' for w in FRUITS]
    docs = [f'a text about the {d} tree' for d in FRUITS]
    loaded = Hypencoder.from_pretrained(tmp_path / 'out' / 'best', device='cpu')
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    expected = model.encode_queries(queries).score(model.encode_docs(docs))
    # equal weights; BLAS kernels may still round differently for differently aligned buffers
    assert torch.allclose(loaded.encode_queries(queries).score(loaded.encode_docs(docs)), expected, rtol=1e-5, atol=1e-4)
    state = json.loads((tmp_path / 'out' / 'trainer_state.json').read_text())
    assert state['step'] == 20 and state['best_metric'] == pytest.approx(trainer.evaluate())


def test_distillation_training(tiny_bert):
    """Margin-MSE + in-batch CE training more than halves the loss.

    At lr 1e-2 a tiny model's loss curve depends on rounding (after 40 steps the ratio was 0.045-0.20 over training
    seeds 0-5 on an Intel Xeon with AVX-512, but 0.64 for seed 0 on an AMD EPYC with AVX-512): at lr 3e-3 it is
    smooth, 0.043-0.059 over seeds 0-4 on the EPYC (threshold 0.5, margin >= 8x).
    """
    model = fruit_hypencoder(tiny_bert)
    trainer = Trainer(model, fruit_frame(teacher=True), fruit_config(loss='auto', steps=40, lr=3e-3), verbose=False)
    assert trainer.loss_name == 'distill'
    trainer.train()
    losses = losses_of(trainer)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_full_fine_tuning_updates_the_backbone(tiny_bert):
    """Full fine-tuning lowers the loss by more than 0.3 and changes the backbone.

    40 steps, because 20 left too little room: over training seeds 0-4 the drop after 20 steps was 0.13-1.08 on
    an Intel Xeon (AVX-512); after 40 steps it is 1.14-2.31 over seeds 0-5 (threshold 0.3, margin >= 3.8x).
    """
    model = fruit_hypencoder(tiny_bert)
    before = next(model.backbone.parameters()).clone()
    trainer = Trainer(model, fruit_frame(), fruit_config(head_only=False, lr=3e-4, head_lr=1e-2, steps=40), verbose=False)
    trainer.train()
    losses = losses_of(trainer)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.3
    assert not torch.equal(next(model.backbone.parameters()), before)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_resume_continues_exactly(tiny_bert, tmp_path):
    straight = fruit_hypencoder(tiny_bert)
    Trainer(straight, fruit_frame(), fruit_config(steps=6, batch_size=4, num_negatives=3), verbose=False).train()

    first = fruit_hypencoder(tiny_bert)
    Trainer(first, fruit_frame(), fruit_config(steps=3, batch_size=4, num_negatives=3), output_dir=tmp_path,
            verbose=False).train()
    assert (tmp_path / 'checkpoint-3' / 'trainer_state.pt').exists()
    resumed = fruit_hypencoder(tiny_bert)  # fresh weights: resuming must restore them
    trainer = Trainer(resumed, fruit_frame(), fruit_config(steps=6, batch_size=4, num_negatives=3), output_dir=tmp_path,
                      verbose=False)
    trainer.train(resume_from=True)
    assert trainer.state.step == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    with pytest.raises(FileNotFoundError, match='not a training checkpoint'):
        Trainer(fruit_hypencoder(tiny_bert), fruit_frame(), fruit_config(), verbose=False).train(resume_from=tmp_path / 'nope')


def test_feature_cache_is_reused(tiny_bert, tmp_path, monkeypatch):
    from pyterrier_hypencoder.train import features as features_module
    trainer = Trainer(fruit_hypencoder(tiny_bert), fruit_frame(), fruit_config(steps=1), cache_dir=tmp_path, verbose=False)
    trainer.train()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith('docs-') and files[1].startswith('queries-')

    def no_encoding(*args, **kwargs):
        raise AssertionError('encoded again instead of reading the cache')

    monkeypatch.setattr(features_module, 'frozen_pooled_docs', no_encoding)
    monkeypatch.setattr(features_module, 'frozen_query_states', no_encoding)
    again = Trainer(fruit_hypencoder(tiny_bert), fruit_frame(), fruit_config(steps=1), cache_dir=tmp_path, verbose=False)
    again._prepare_features()
    assert torch.equal(again._train_docs, trainer._train_docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_trainer_rejects_bad_options(tiny_bert):
    with pytest.raises(ValueError, match='schedule'):
        TrainConfig(schedule='cosine')
    for bad, message in [(dict(log_every=0), 'log_every must be >= 1'), (dict(eval_every=-1), 'eval_every must be >= 0'),
                         (dict(lr=-1e-3), 'lr must be > 0'), (dict(temperature=0), 'temperature must be > 0'),
                         (dict(metric='nonsense'), "metric='nonsense' is not an ir_measures measure")]:
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    with_nan = fruit_frame().assign(score=1.0)
    with_nan.loc[3, 'score'] = float('nan')
    with pytest.raises(ValueError, match='1 missing or infinite teacher scores'):
        Trainer(fruit_hypencoder(tiny_bert), with_nan, fruit_config(loss='distill'), verbose=False)
    with pytest.raises(ValueError, match='use_teacher=True but the training data has no score column'):
        Trainer(fruit_hypencoder(tiny_bert), fruit_frame(), fruit_config(loss='distill'), verbose=False)
    with pytest.raises(ValueError, match='the distill loss needs teacher scores'):  # groups built without them
        Trainer(fruit_hypencoder(tiny_bert), TrainingGroups(fruit_frame()), fruit_config(loss='distill'), verbose=False)
    with pytest.raises(ValueError, match='exceeds'):
        Trainer(fruit_hypencoder(tiny_bert), fruit_frame(), fruit_config(batch_size=11), verbose=False)
