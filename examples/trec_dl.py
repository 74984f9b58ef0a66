"""The released 6-layer Hypencoder on TREC DL 2019 and 2020, against BM25 and TAS-B (needs network and a GPU).

    python examples/trec_dl.py --index-dir /data/msmarco

Downloads ``jfkback/hypencoder.6_layer`` and MS MARCO passage (8.8M passages) through ir_datasets, builds a
Hypencoder index (vectors in float16 plus the 100-NN graph; several GPU-hours), a PISA BM25 index and a TAS-B
FlexIndex (pyterrier-dr), then evaluates on both TREC DL years. Indexes are reused when they exist.
"""
import argparse
from pathlib import Path

import pyterrier as pt
from ir_measures import RR, R, nDCG

from pyterrier_hypencoder import Hypencoder, HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.optional import require


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index-dir', default='indexes', help='where the three indexes go')
    parser.add_argument('--model', default='jfkback/hypencoder.6_layer')
    parser.add_argument('--batch-size', type=int, default=256)
    args = parser.parse_args()
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'pyterrier_dr', purpose='examples/trec_dl.py')
    out = Path(args.index_dir)

    import pyterrier_dr
    from pyterrier_pisa import PisaIndex

    corpus = pt.get_dataset('irds:msmarco-passage')
    model = Hypencoder.from_pretrained(args.model, dtype='fp16')

    index = HypencoderIndex(out / 'msmarco.hypencoder')
    if not index.built():
        HypencoderIndexer(model, index.path, fp16=True, batch_size=args.batch_size).index(corpus.get_corpus_iter())

    pisa = PisaIndex(str(out / 'msmarco.pisa'), text_field='text')
    if not pisa.built():
        pisa.index(corpus.get_corpus_iter())

    tasb = pyterrier_dr.TasB.dot()
    flex = pyterrier_dr.FlexIndex(str(out / 'msmarco.tasb.flex'))
    if not flex.built():
        (tasb >> flex.indexer()).index(corpus.get_corpus_iter())

    systems = [pisa.bm25(), tasb >> flex.retriever(), index.retriever(model),
               index.retriever(model, mode='graph')]
    names = ['BM25', 'TAS-B', 'Hypencoder (exhaustive)', 'Hypencoder (graph walk, Efficient 1)']
    for year in ('2019', '2020'):
        dataset = pt.get_dataset(f'irds:msmarco-passage/trec-dl-{year}/judged')
        print(f'TREC DL {year}')
        print(pt.Experiment(systems, dataset.get_topics(), dataset.get_qrels(),
                            [nDCG @ 10, RR(rel=2) @ 10, R(rel=2) @ 1000], names=names, round=4).to_string(index=False))


if __name__ == '__main__':
    main()
