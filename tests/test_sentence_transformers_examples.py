"""The sentence-transformers examples, run in-process on a tiny text file with the packaged MiniLM."""

import numpy as np
import pytest

from .helpers import load_example, minilm_path

pytest.importorskip("sentence_transformers")

TEXTS = ["Bread rises because yeast makes gas.", "", "Bees collect nectar.", "The oven was hot.", "Hi"]


@pytest.fixture
def text_file(tmp_path):
    minilm_path()  # skips (or fails in CI) without the packaged checkpoint
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    return path


def test_embedding_example_writes_the_unpatched_models_embeddings(text_file, tmp_path, capsys):
    out = tmp_path / "emb.npy"
    argv = ["--input", str(text_file), "--output", str(out), "--batch-size", "2", "--backend", "reference"]
    result = load_example("sentence_embeddings").main([*argv, "--device", "cpu", "--check"])
    embeddings = np.load(out)
    assert embeddings.shape == (4, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert result["max_abs_diff"] <= 1e-5
    assert "bertfast patched 0.model" in capsys.readouterr().out


def test_sentence_embeddings_example_in_fp8(text_file, tmp_path, capsys):
    out = tmp_path / "fp8.npy"
    argv = ["--input", str(text_file), "--output", str(out), "--batch-size", "2", "--no-progress", "--fp8"]
    result = load_example("sentence_embeddings").main([*argv, "--backend", "reference", "--device", "cpu", "--check"])
    assert np.load(out).shape == (4, 384)
    assert 0.99 < result["min_cosine"] < 1.0 - 1e-6  # FP8 ran, and stays close
    assert "weights calibrated on 4 texts" in capsys.readouterr().out


def test_rerank_example_ranks_every_candidate_with_the_unpatched_models_scores(text_file, capsys):
    argv = ["--query", "how is bread made?", "--candidates", str(text_file), "--top-k", "3", "--check"]
    result = load_example("rerank").main([*argv, "--backend", "reference", "--device", "cpu", "--no-progress"])
    assert len(result["top"]) == 3 and len(set(result["top"])) == 3
    assert result["scores"].shape == (4,)
    assert result["max_abs_diff"] <= 1e-5
    assert "top 3 for 'how is bread made?'" in capsys.readouterr().out
