import json

import pytest
import transformers

from bertfast import BertConfig


def test_defaults_match_hugging_face():
    ours = BertConfig().to_dict()
    theirs = transformers.BertConfig().to_dict()
    for key in ours:
        if key in theirs and key != "transformers_version":
            assert ours[key] == theirs[key], key
    assert ours["hidden_act"] == "gelu" and ours["layer_norm_eps"] == 1e-12


def test_presets():
    large = BertConfig.bert_large()
    assert (large.num_hidden_layers, large.hidden_size, large.num_attention_heads, large.intermediate_size) == (
        24,
        1024,
        16,
        4096,
    )
    assert large.head_dim == 64
    base = BertConfig.bert_base()
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    assert BertConfig.bert_large(num_hidden_layers=2).num_hidden_layers == 2


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "not divisible"),
        (dict(hidden_act="relu"), "hidden_act"),
        (dict(hidden_act="gelu_new"), "hidden_act"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_invalid_configs_name_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**fields)


def test_from_pretrained_round_trip_keeps_unknown_keys(tmp_path):
    config = BertConfig(hidden_size=96, num_attention_heads=4, num_hidden_layers=3)
    config.extra["architectures"] = ["BertModel"]
    config.save_pretrained(tmp_path)
    loaded = BertConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "bert"


def test_from_pretrained_reads_hugging_face_config(tmp_path):
    transformers.BertConfig(hidden_size=64, num_attention_heads=2, num_labels=5).save_pretrained(tmp_path)
    loaded = BertConfig.from_pretrained(tmp_path)
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.num_labels) == (64, 2, 5)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        BertConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "is_decoder": True}))
    with pytest.raises(ValueError, match="encoder only"):
        BertConfig.from_pretrained(tmp_path)
