"""Loading local Hugging Face-format checkpoints: formats, key variants, errors by name."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import bertfast
from bertfast.loading import CheckpointError

from .helpers import small_config


def _write(folder, model, state=None, fmt="safetensors", shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in (state if state is not None else model.state_dict()).items()}
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return folder
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("fmt, shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1)])
def test_formats(tmp_path, fmt, shards):
    model = bertfast.BertModel(small_config())
    folder = _write(tmp_path / "ckpt", model, fmt=fmt, shards=shards)
    loaded = bertfast.BertModel.from_pretrained(folder, backend="reference")
    assert _same_weights(model, loaded) and not loaded.training
    assert loaded.backend == "reference"


def test_dtype_and_device(tmp_path):
    model = bertfast.BertModel(small_config())
    loaded = bertfast.BertModel.from_pretrained(_write(tmp_path, model), dtype=torch.float16, device="cpu")
    assert all(p.dtype == torch.float16 for p in loaded.parameters())


def test_with_and_without_prefix_and_legacy_names(tmp_path):
    mlm = bertfast.BertForMaskedLM(small_config())
    # a BertForMaskedLM checkpoint loads into BertModel (prefix stripped, head ignored with a warning)
    folder = _write(tmp_path / "mlm", mlm)
    with pytest.warns(UserWarning, match="cls.predictions"):
        base = bertfast.BertModel.from_pretrained(folder)
    assert torch.equal(base.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)
    # a bare BertModel checkpoint with legacy gamma/beta names loads into a head (prefix added)
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in base.state_dict().items()
    }
    legacy["embeddings.position_ids"] = torch.arange(base.config.max_position_embeddings)[None]
    folder = _write(tmp_path / "legacy", base, state=legacy)
    with pytest.warns(UserWarning, match="classifier.weight"):
        clf = bertfast.BertForSequenceClassification.from_pretrained(folder)
    assert clf.loading_info.missing_keys == ["classifier.bias", "classifier.weight"]
    assert torch.equal(clf.bert.encoder.layer[1].output.LayerNorm.weight, base.encoder.layer[1].output.LayerNorm.weight)
    # the tied decoder weight need not be stored
    state = {k: v for k, v in mlm.state_dict().items() if k != "cls.predictions.decoder.weight"}
    loaded = bertfast.BertForMaskedLM.from_pretrained(_write(tmp_path / "tied", mlm, state=state), strict=True)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert _same_weights(mlm, loaded)


def test_errors_name_the_tensors(tmp_path):
    model = bertfast.BertModel(small_config())
    state = model.state_dict()
    bad = dict(state)
    bad["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.intermediate.dense.weight: checkpoint \(3, 3\)"):
        bertfast.BertModel.from_pretrained(_write(tmp_path / "shape", model, state=bad))
    missing = {k: v for k, v in state.items() if "layer.1.output.dense" not in k}
    with pytest.raises(CheckpointError, match="encoder.layer.1.output.dense.bias"):
        bertfast.BertModel.from_pretrained(_write(tmp_path / "missing", model, state=missing))
    extra = dict(state, **{"encoder.layer.9.foo": torch.zeros(1)})
    with pytest.warns(UserWarning, match="encoder.layer.9.foo"):
        bertfast.BertModel.from_pretrained(_write(tmp_path / "extra", model, state=extra))
    with pytest.raises(CheckpointError, match="strict"):
        bertfast.BertModel.from_pretrained(tmp_path / "extra", strict=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(model.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        bertfast.BertModel.from_pretrained(tmp_path / "empty")


class _Exploit:
    def __reduce__(self):
        return (print, ("this checkpoint ran code",))


def test_pickled_code_is_never_run(tmp_path, capsys):
    model = bertfast.BertModel(small_config())
    folder = _write(tmp_path, model, fmt="bin")
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(pickle.UnpicklingError):
        bertfast.BertModel.from_pretrained(folder)
    assert "ran code" not in capsys.readouterr().out


def test_save_pretrained_round_trip_through_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    mlm = bertfast.BertForMaskedLM(small_config())
    mlm.save_pretrained(tmp_path)
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path)
    assert torch.equal(hf.cls.predictions.decoder.weight, mlm.bert.embeddings.word_embeddings.weight)
    back = bertfast.BertForMaskedLM.from_pretrained(tmp_path, strict=True)
    assert _same_weights(mlm, back)


def test_index_without_weight_map_names_the_file(tmp_path):
    model = bertfast.BertModel(small_config())
    folder = _write(tmp_path, model, shards=2)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json has no 'weight_map'"):
        bertfast.BertModel.from_pretrained(folder)


def test_a_key_stored_with_and_without_prefix(tmp_path):
    model = bertfast.BertModel(small_config())
    state = dict(model.state_dict())
    key = "encoder.layer.0.output.dense.bias"
    same = dict(state, **{f"bert.{key}": state[key].clone()})
    loaded = bertfast.BertModel.from_pretrained(_write(tmp_path / "same", model, state=same), strict=True)
    assert _same_weights(model, loaded)
    differ = dict(state, **{f"bert.{key}": state[key] + 1})
    message = rf"both '(bert.)?{key}' and '(bert.)?{key}', which both load into '{key}', with different values"
    with pytest.raises(CheckpointError, match=message):
        bertfast.BertModel.from_pretrained(_write(tmp_path / "differ", model, state=differ))


def test_untied_decoder_is_refused_not_loaded_over_the_embeddings(tmp_path):
    mlm = bertfast.BertForMaskedLM(small_config())
    state = dict(mlm.state_dict())
    decoder = "cls.predictions.decoder.weight"
    state[decoder] = state[decoder] + 2.0  # an untied checkpoint: the decoder differs from the embeddings
    folder = _write(tmp_path / "untied", mlm, state=state)
    with pytest.raises(CheckpointError, match=f"{decoder}.*differs from 'bert.embeddings.word_embeddings.weight'"):
        bertfast.BertForMaskedLM.from_pretrained(folder)
    # The encoder alone loads: the decoder is not part of it.
    with pytest.warns(UserWarning, match="does not use"):
        encoder = bertfast.BertModel.from_pretrained(folder)
    assert torch.equal(encoder.embeddings.word_embeddings.weight, mlm.bert.embeddings.word_embeddings.weight)
    # A config that says so is refused even if the tensors happen to be equal.
    mlm.config.extra["tie_word_embeddings"] = False
    with pytest.raises(CheckpointError, match="tie_word_embeddings=false"):
        bertfast.BertForMaskedLM.from_pretrained(_write(tmp_path / "flag", mlm))


def test_save_pretrained_writes_the_weights_dtype(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = bertfast.BertModel(small_config()).to(torch.bfloat16)
    model.config.extra["torch_dtype"] = "float32"  # as read from an older checkpoint
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and "torch_dtype" not in written
    hf = transformers.BertModel.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
