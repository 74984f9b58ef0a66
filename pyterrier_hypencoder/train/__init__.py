"""Training Hypencoders (and the BE-Base inner-product baseline) on PyTerrier data.

- :mod:`~pyterrier_hypencoder.train.losses`: the paper's losses as pure functions over score tensors.
- :mod:`~pyterrier_hypencoder.train.datasets`: PyTerrier datasets and BEIR-layout folders as frames, BM25 over them.
- :mod:`~pyterrier_hypencoder.train.data`: training data frames built from them, batch sampling, dev sets.
- :class:`DotEncoder`: BE-Base, the same backbone with an inner-product head.
- :class:`Trainer` / :class:`TrainConfig` (:mod:`~pyterrier_hypencoder.train.config`): head-only (frozen backbone,
  CPU-friendly) or full fine-tuning; :mod:`~pyterrier_hypencoder.train.features` caches the frozen encodings and
  :mod:`~pyterrier_hypencoder.train.evaluation` ranks for dev evaluation.
- :mod:`~pyterrier_hypencoder.train.warm_start`: Hypencoders that start as MiniLM's own similarity or as a trained
  BE-Base; :mod:`~pyterrier_hypencoder.train.principal_axes` orders their hidden units for Matryoshka training.
- ``python -m pyterrier_hypencoder.train --help``: the command line.
"""
from .biencoder import DotEncoder
from .config import TrainConfig
from .data import (
    Batch,
    DevSet,
    TrainingGroups,
    build_training_data,
    load_frame,
    save_frame,
    training_data_from_dataset,
)
from .datasets import BeirFolder, dataset_docs, dataset_topics, pisa_bm25, read_beir_folder, split_topics
from .evaluation import ModelScorer, exhaustive_retrieve
from .features import FeatureStore
from .losses import distillation_loss, hard_negative_cross_entropy, in_batch_cross_entropy, margin_mse
from .principal_axes import principal_rotation
from .trainer import Trainer
from .warm_start import warm_start_from_dot, warm_start_hypencoder

__all__ = [
    'Batch', 'BeirFolder', 'DevSet', 'DotEncoder', 'FeatureStore', 'ModelScorer', 'TrainConfig', 'Trainer',
    'TrainingGroups', 'build_training_data', 'dataset_docs', 'dataset_topics', 'distillation_loss',
    'exhaustive_retrieve', 'hard_negative_cross_entropy', 'in_batch_cross_entropy', 'load_frame', 'margin_mse',
    'pisa_bm25', 'principal_rotation', 'read_beir_folder', 'save_frame', 'split_topics', 'training_data_from_dataset',
    'warm_start_from_dot', 'warm_start_hypencoder',
]
