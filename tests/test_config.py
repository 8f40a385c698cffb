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
        (dict(layer_norm_eps="1e-12"), "layer_norm_eps must be a number"),
        (dict(hidden_dropout_prob="0.1"), "hidden_dropout_prob must be a number"),
        (dict(initializer_range=None), "initializer_range must be a number"),
        (dict(hidden_size="768"), "hidden_size must be a positive integer"),
        (dict(pad_token_id=30522), "pad_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(pad_token_id="0"), "pad_token_id"),
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


def test_config_file_errors_name_the_file_and_field(tmp_path):
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"model_type": "bert", "attention_probs_dropout_prob": "0.1"}))
    with pytest.raises(ValueError, match=r"config.json: BertConfig.attention_probs_dropout_prob must be a number"):
        BertConfig.from_pretrained(tmp_path)
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        BertConfig.from_pretrained(tmp_path)
    config_file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        BertConfig.from_pretrained(tmp_path)


def test_pad_token_id_may_be_none():
    assert BertConfig(pad_token_id=None).pad_token_id is None
