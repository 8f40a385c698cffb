"""The BERT family (RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT) through the one layer path."""

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bertfast  # noqa: E402
from bertfast.numerics import MODEL_FP32_REL_TOL, rel_error  # noqa: E402
from bertfast.patching import PatchError  # noqa: E402

from .helpers import span_outputs_under_the_rule, triton_device  # noqa: E402
from .test_one_path import _matmul_flops  # noqa: E402
from .test_patching import TRITON  # noqa: E402

SIZES = dict(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=70)
DROPOUT_OFF = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
ROBERTA_STYLE = dict(SIZES, **DROPOUT_OFF, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)

# family: (transformers class prefix, config class, config fields)
FAMILIES = {
    "roberta": ("Roberta", "RobertaConfig", ROBERTA_STYLE),
    "xlm-roberta": ("XLMRoberta", "XLMRobertaConfig", ROBERTA_STYLE),
    "camembert": ("Camembert", "CamembertConfig", ROBERTA_STYLE),
    "electra": ("Electra", "ElectraConfig", dict(SIZES, **DROPOUT_OFF, embedding_size=48, max_position_embeddings=40)),
    "distilbert": (
        "DistilBert",
        "DistilBertConfig",
        dict(vocab_size=101, dim=48, n_layers=2, n_heads=3, hidden_dim=70, dropout=0.0, attention_dropout=0.0),
    ),
}
HEADS = {
    "roberta": ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"],
    "electra": [
        "Model",
        "ForSequenceClassification",
        "ForTokenClassification",
        "ForQuestionAnswering",
        "ForMaskedLM",
        "ForPreTraining",
    ],
    "distilbert": [
        "Model",
        "ForSequenceClassification",
        "ForTokenClassification",
        "ForQuestionAnswering",
        "ForMaskedLM",
    ],
}
HEADS["xlm-roberta"] = HEADS["camembert"] = HEADS["roberta"]
CASES = [(family, head) for family in FAMILIES for head in HEADS[family]]


def hf_config(family: str, **overrides):
    _, config_class, fields = FAMILIES[family]
    return getattr(transformers, config_class)(**{**fields, **overrides}, attn_implementation="eager")


def hf_model(family: str, head: str, **overrides):
    prefix = FAMILIES[family][0]
    num_labels = 2 if head == "ForQuestionAnswering" else 3
    torch.manual_seed(0)
    return getattr(transformers, prefix + head)(hf_config(family, num_labels=num_labels, **overrides)).eval()


def batch(config, lengths, seq, left=False, seed=0):
    """Ids of real tokens (never the padding id) and ``pad_token_id`` at padding, as a tokenizer gives."""
    g = torch.Generator().manual_seed(seed)
    pad_id = config.pad_token_id
    ids = torch.randint(pad_id + 1, config.vocab_size, (len(lengths), seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    if left:
        mask = mask.flip(1)
    return ids.masked_fill(mask == 0, pad_id), mask


def labels_for(head, config, mask, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows, seq = mask.shape
    if head in ("ForMaskedLM", "ForTokenClassification", "ForPreTraining"):
        classes = {"ForMaskedLM": config.vocab_size, "ForPreTraining": 2}.get(head, config.num_labels)
        return {"labels": torch.randint(0, classes, (rows, seq), generator=g).masked_fill(mask == 0, -100)}
    if head == "ForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (rows,), generator=g)}
    if head == "ForQuestionAnswering":
        first = (mask == 0).long().sum(1) * (mask[:, 0] == 0).long()  # left padding: real tokens start later
        return {"start_positions": first, "end_positions": first + mask.sum(1) - 1}
    return {}


def per_token(value, mask):
    return value[mask.bool()] if value.dim() >= 2 and tuple(value.shape[:2]) == tuple(mask.shape) else value


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("family, head", CASES)
def test_patched_matches_transformers_at_real_tokens(family, head, left):
    reference = hf_model(family, head)
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    config = reference.config
    ids, mask = batch(config, [9, 4, 7], 9, left=left)
    labels = labels_for(head, config, mask)
    ours = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, **labels)
    theirs = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True, **labels)
    if head == "ForQuestionAnswering":  # bertfast keeps padding out of the span softmax (head_losses)
        theirs = span_outputs_under_the_rule(theirs, mask, labels["start_positions"], labels["end_positions"])
    assert type(ours) is type(theirs) and list(ours.keys()) == list(theirs.keys())
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 3
    for key in theirs.keys():
        pairs = zip(ours[key], theirs[key]) if key == "hidden_states" else [(ours[key], theirs[key])]
        for a, b in pairs:
            err = rel_error(per_token(a, mask), per_token(b, mask))
            assert err <= MODEL_FP32_REL_TOL, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_runs_padding_free(family):
    reference = hf_model(family, "Model")
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    lengths, seq = [16, 5, 3, 4], 16
    ids, mask = batch(reference.config, lengths, seq)
    share = sum(lengths) / (len(lengths) * seq)
    padded = _matmul_flops(lambda: reference(input_ids=ids, attention_mask=mask))
    ratio = _matmul_flops(lambda: model(input_ids=ids, attention_mask=mask)) / padded
    assert ratio <= share * 1.15, f"{ratio:.2f} of the padded FLOPs for a real-token share of {share:.2f}"


@pytest.mark.parametrize("backend", ["ext", pytest.param("triton", marks=TRITON)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_family_on_the_kernel_backends(family, backend):
    """The fused embedding (DistilBERT: a zero token-type row) and layer kernels; one layer, the interpreter is slow."""
    layers = {"n_layers": 1} if family == "distilbert" else {"num_hidden_layers": 1}
    reference = hf_model(family, "ForTokenClassification", **layers)
    if bertfast.ops.backend_availability(backend) is not None:
        pytest.skip(bertfast.ops.backend_availability(backend))
    device = triton_device() if backend == "triton" else "cpu"
    model = bertfast.patch(copy.deepcopy(reference), backend=backend, strict=True).to(device)
    ids, mask = batch(reference.config, [6, 3], 6, left=True)
    ours = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.cpu()
    theirs = reference(input_ids=ids, attention_mask=mask).logits
    assert rel_error(per_token(ours, mask), per_token(theirs, mask)) <= MODEL_FP32_REL_TOL


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("family", ["roberta", "electra", "distilbert"])
def test_patched_family_trains_like_transformers(family, checkpointing):
    """In training mode (dropout 0), gradients of every parameter equal transformers' (a loss on real tokens)."""
    reference = hf_model(family, "ForTokenClassification").train()
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    ids, mask = batch(reference.config, [9, 4, 7], 9, left=True)
    labels = labels_for("ForTokenClassification", reference.config, mask)
    calls = []
    for m in (model, reference):
        if checkpointing:  # transformers 5.2x renamed it (the old name warns); 5.17 has the old name only
            enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
            enable()
    if checkpointing:  # the patched forward calls transformers' checkpointing function once per layer
        for layer in bertfast.family.encoder_layers(bertfast.family.find_base_model(model)[0]):
            original = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
    for m in (model, reference):
        m(input_ids=ids, attention_mask=mask, **labels).loss.backward()
    assert len(calls) == (2 if checkpointing else 0)
    reference_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith(("key.bias", "k_lin.bias")):  # softmax is shift invariant: both are rounding noise
            continue
        assert rel_error(p.grad, reference_params[name].grad) <= 1e-4, name


def test_roberta_positions_count_real_tokens_from_inputs_embeds_too():
    reference = hf_model("roberta", "Model")
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    ids, mask = batch(reference.config, [6, 3], 6, left=True)
    embeds = reference.embeddings.word_embeddings(ids)
    ours = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    theirs = reference(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert rel_error(per_token(ours, mask), per_token(theirs, mask)) <= MODEL_FP32_REL_TOL


def test_electra_with_a_projected_embedding_is_refused_clearly():
    model = hf_model("electra", "ForSequenceClassification", embedding_size=32)
    with pytest.raises(PatchError, match=r"embedding_size \(32\) differs from hidden_size \(48\)"):
        bertfast.patch(model, strict=True)
    assert not bertfast.is_patched(model)


# --------------------------------------------------------------------------------------
# Native classes built from family models (from_hf) and checkpoints (from_pretrained)
# --------------------------------------------------------------------------------------

NATIVE_CASES = [
    (family, head)
    for family in FAMILIES
    for head in ("Model", "ForMaskedLM", "ForTokenClassification", "ForQuestionAnswering", "ForSequenceClassification")
    if (family, head) != ("distilbert", "ForQuestionAnswering")
]


def assert_native_matches(model, reference, left):
    config = reference.config
    ids, mask = batch(config, [9, 4, 7], 9, left=left)
    head = type(model).__name__.removeprefix("Bert")
    labels = labels_for(head, config, mask)
    ours = model(input_ids=ids, attention_mask=mask, **labels)
    theirs = reference(input_ids=ids, attention_mask=mask, **labels)
    if head == "ForQuestionAnswering":  # bertfast keeps padding out of the span softmax (head_losses)
        theirs = span_outputs_under_the_rule(theirs, mask, labels["start_positions"], labels["end_positions"])
    for key in ("last_hidden_state", "logits", "start_logits", "end_logits", "loss"):
        if key in theirs and theirs[key] is not None:
            err = rel_error(per_token(ours[key], mask), per_token(theirs[key], mask))
            assert err <= MODEL_FP32_REL_TOL, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("family, head", NATIVE_CASES)
def test_from_hf_matches_transformers(family, head, left):
    reference = hf_model(family, head)
    model = bertfast.from_hf(reference, backend="reference")
    assert type(model).__name__ == "Bert" + head
    assert_native_matches(model, reference, left)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_from_pretrained_reads_family_checkpoints(family, tmp_path):
    reference = hf_model(family, "ForMaskedLM")
    reference.save_pretrained(tmp_path)
    model = bertfast.BertForMaskedLM.from_pretrained(tmp_path, backend="reference", strict=True)
    assert_native_matches(model, reference, left=True)
    model.save_pretrained(tmp_path / "again")  # the family's layout
    again = bertfast.BertForMaskedLM.from_pretrained(tmp_path / "again", backend="reference", strict=True)
    assert_native_matches(again, reference, left=True)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_classification_heads_map_onto_the_pooler_and_train_alike(family, tmp_path):
    """RoBERTa's/ELECTRA's dropout-dense-activation-dropout-out_proj head and DistilBERT's
    pre_classifier-ReLU-dropout-classifier are BERT's pooler (its activation, a dropout before the dense
    layer) and classifier: the same logits, loss and gradients in training (dropout 0), from a live model
    and from a saved checkpoint."""
    no_dropout = {"seq_classif_dropout": 0.0} if family == "distilbert" else {}
    reference = hf_model(family, "ForSequenceClassification", **no_dropout).train()
    model = bertfast.from_hf(reference, backend="reference")
    expected = {"roberta": "tanh", "xlm-roberta": "tanh", "camembert": "tanh", "electra": "gelu"}
    assert model.bert.pooler.act == expected.get(family, "relu")
    assert (model.bert.pooler.dropout is None) == (family == "distilbert")
    ids, mask = batch(reference.config, [9, 4, 7], 9)
    labels = torch.tensor([0, 2, 1])
    ours = model(input_ids=ids, attention_mask=mask, labels=labels)
    theirs = reference(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_error(ours.loss, theirs.loss) <= MODEL_FP32_REL_TOL
    ours.loss.backward()
    theirs.loss.backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    head_dense = "pre_classifier.weight" if family == "distilbert" else "classifier.dense.weight"
    assert rel_error(model.bert.pooler.dense.weight.grad, grads[head_dense]) <= 1e-4
    reference.save_pretrained(tmp_path)
    loaded = bertfast.BertForSequenceClassification.from_pretrained(tmp_path, backend="reference", strict=True)
    assert loaded.bert.pooler.act == model.bert.pooler.act
    assert_native_matches(loaded.eval(), reference.eval(), left=True)


@pytest.mark.parametrize(
    "family, head, match",
    [
        ("roberta", "ForMultipleChoice", "RobertaForMultipleChoice has no bertfast native class"),
        ("electra", "ForPreTraining", "ElectraForPreTraining has no bertfast native class"),
        ("distilbert", "ForQuestionAnswering", "DistilBertForQuestionAnswering has no bertfast native class"),
    ],
)
def test_heads_without_a_native_class_are_refused_by_name(family, head, match, tmp_path):
    reference = hf_model(family, head)
    with pytest.raises(TypeError, match=match):
        bertfast.from_hf(reference)
    reference.save_pretrained(tmp_path)
    # A checkpoint of such a head loads into a native head class as its encoder, the head named as not loaded.
    native = {"ForPreTraining": "ForMaskedLM", "ForMultipleChoice": "ForSequenceClassification"}.get(head, head)
    loaded = rf"{match.split()[0]} checkpoint .*: bertfast.Bert{native} loads its encoder only"
    with pytest.warns(UserWarning, match=loaded):
        getattr(bertfast, "Bert" + native).from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="not in the checkpoint|the model does not use"):  # its own head, no pooler
        bertfast.BertModel.from_pretrained(tmp_path, backend="reference")  # the encoder alone loads


def test_electra_with_a_projected_embedding_is_refused_by_from_hf_and_from_pretrained(tmp_path):
    reference = hf_model("electra", "Model", embedding_size=32)
    match = r"embedding_size \(32\) differs from hidden_size \(48\)"
    with pytest.raises(ValueError, match=match):
        bertfast.from_hf(reference)
    reference.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        bertfast.BertModel.from_pretrained(tmp_path)


def test_native_distilbert_keeps_its_dropout_layout(tmp_path):
    """No dropout after DistilBERT's attention projection; its hidden and attention rates where it has them."""
    reference = hf_model("distilbert", "ForTokenClassification", dropout=0.2, attention_dropout=0.3)
    reference.save_pretrained(tmp_path)
    for model in (bertfast.from_hf(reference), bertfast.BertForTokenClassification.from_pretrained(tmp_path)):
        for layer in model.bert.encoder.layer:
            assert layer.attention.output.dropout.p == 0.0
            assert (layer.output.dropout.p, layer.attention.self.dropout.p) == (0.2, 0.3)
        assert model.dropout.p == 0.2  # the token classifier's, as DistilBERT's


def test_from_hf_refuses_a_replaced_family_activation_and_a_foreign_config():
    model = hf_model("distilbert", "ForMaskedLM")
    model.distilbert.transformer.layer[1].ffn.activation = torch.nn.ReLU()
    with pytest.raises(ValueError, match=r"transformer.layer.1.ffn uses ReLU"):
        bertfast.from_hf(model)
    with pytest.raises(ValueError, match="expected a config of the BERT family"):
        bertfast.modeling.config_from_hf(transformers.GPT2Config())


@pytest.mark.parametrize("head", ["Model", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM"])
def test_electra_discriminator_checkpoints_load_their_encoder_into_native_classes(head, tmp_path):
    """As published (architectures: ElectraForPreTraining): the encoder loads, the discriminator head is named as
    not loaded, the class's own head is reported missing."""
    reference = hf_model("electra", "ForPreTraining")
    reference.save_pretrained(tmp_path)
    cls = getattr(bertfast, "Bert" + head)
    with pytest.warns(UserWarning) as caught:
        model = cls.from_pretrained(tmp_path, backend="reference")
    messages = " ".join(str(w.message) for w in caught)
    assert "discriminator_predictions.dense.weight" in messages
    if head != "Model":
        assert "a ElectraForPreTraining checkpoint (ELECTRA's discriminator head has no native class)" in messages
    ids, mask = batch(reference.config, [7, 4], 7)
    encoder = model if head == "Model" else model.bert
    ours = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = reference.electra(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_error(ours[mask.bool()], theirs[mask.bool()]) <= MODEL_FP32_REL_TOL


@pytest.mark.parametrize("face", ["patched", "native"])
@pytest.mark.parametrize("embeds", [False, True])
def test_roberta_too_long_sequence_names_the_real_limit(face, embeds):
    """RoBERTa-style positions start at pad_token_id + 1: max_position_embeddings 40 with pad_token_id 1 takes 38
    tokens.  Too long a sequence is refused naming that limit and the length passed, not position ids the user
    never gave; the longest that fits runs as transformers does."""
    reference = hf_model("roberta", "Model")
    model = bertfast.patch(copy.deepcopy(reference), backend="reference") if face == "patched" else None
    model = model or bertfast.from_hf(reference, backend="reference")
    for length in (38, 39):
        ids, mask = batch(reference.config, [length], length)
        inputs = {"inputs_embeds": reference.embeddings.word_embeddings(ids)} if embeds else {"input_ids": ids}
        if length == 38:
            with torch.no_grad():
                ours, theirs = model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state
            assert rel_error(ours, theirs) <= MODEL_FP32_REL_TOL
            continue
        with pytest.raises(ValueError, match=r"39 tokens.*pad_token_id \(1\) \+ 1.*at most 38 tokens") as error:
            model(**inputs)
        assert "position_ids" not in str(error.value)


@pytest.mark.parametrize("summary_type", ["first", "last", "mean", "cls_index"])
@pytest.mark.parametrize("left", [False, True])
def test_electra_multiple_choice_summary_reads_what_transformers_reads(summary_type, left):
    """ELECTRA's multiple-choice head summarises the last token, the mean over every position or the token at
    cls_index (the last): padding included, whose hidden states transformers computes.  The patched encoder runs
    such batches padded so the logits are transformers'; unpad=True refuses them, naming why."""
    reference = hf_model("electra", "ForMultipleChoice", summary_type=summary_type)
    model = bertfast.patch(copy.deepcopy(reference), backend="reference", strict=True)
    ids, mask = batch(reference.config, [7, 4, 9, 2, 9, 5], 9, left=left)
    inputs = dict(input_ids=ids.view(2, 3, 9), attention_mask=mask.view(2, 3, 9), labels=torch.tensor([0, 2]))
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    assert rel_error(ours.logits, theirs.logits) <= MODEL_FP32_REL_TOL
    assert rel_error(ours.loss, theirs.loss) <= MODEL_FP32_REL_TOL
    if summary_type != "first":
        bertfast.patch(model, backend="reference", unpad=True)
        with pytest.raises(ValueError, match="reads hidden states at padding"):
            model(**inputs)


# --------------------------------------------------------------------------------------
# Heads chosen by the family; DistilBERT without token types; saves in the family's layout
# --------------------------------------------------------------------------------------

AUTO_CLASSES = {
    "Model": "AutoModel",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForMaskedLM": "AutoModelForMaskedLM",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_sequence_classification_head_follows_the_family_not_architectures(family, tmp_path):
    """A classification head's weights saved under a base model's ``architectures`` (as a fine-tuning script that
    edits config.json may leave them) still build the family's head: ReLU / GELU / the pre-dense dropout."""
    no_dropout = {"seq_classif_dropout": 0.0} if family == "distilbert" else {}
    reference = hf_model(family, "ForSequenceClassification", **no_dropout).train()
    reference.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "architectures": [FAMILIES[family][0] + "Model"]}))
    loaded = bertfast.BertForSequenceClassification.from_pretrained(tmp_path, backend="reference", strict=True)
    ids, mask = batch(reference.config, [9, 4, 7], 9)
    assert loaded.bert.pooler.act == {"electra": "gelu", "distilbert": "relu"}.get(family, "tanh")
    assert_native_matches(loaded, reference.eval(), left=False)
    # The pre-dense dropout is there in training (RoBERTa style, ELECTRA), as transformers' head has it.
    assert (loaded.bert.pooler.dropout is not None) == (family != "distilbert")


def test_a_native_distilbert_has_no_token_types_and_trains_like_transformers():
    """No token-type table to train (transformers' DistilBERT has none): AdamW steps move the same parameters
    the same way, pair-tokenizer token_type_ids are ignored."""
    reference = hf_model("distilbert", "ForSequenceClassification", seq_classif_dropout=0.0).train()
    model = bertfast.from_hf(reference, backend="reference")
    assert not any("token_type" in name for name, _ in model.named_parameters())
    ours = dict(model.named_parameters())
    theirs = dict(reference.named_parameters())
    assert len(ours) == len(theirs)
    ids, mask = batch(reference.config, [9, 4, 7], 9)
    labels = torch.tensor([0, 2, 1])
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference)]
    for _ in range(3):
        for m, optimizer in zip((model, reference), optimizers):
            optimizer.zero_grad()
            m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
    pooled = model.bert.pooler.dense.weight
    assert rel_error(pooled, theirs["pre_classifier.weight"]) <= 1e-4
    word = model.bert.embeddings.word_embeddings.weight
    assert rel_error(word, theirs["distilbert.embeddings.word_embeddings.weight"]) <= 1e-4
    types = torch.ones_like(ids)  # a pair tokenizer's second segment: ignored, as transformers does
    with_types = model.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.equal(with_types, model(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("family, head", NATIVE_CASES)
def test_save_pretrained_writes_the_family_layout_transformers_loads(family, head, tmp_path):
    """save -> transformers' Auto class: the family's class, no missing or unexpected tensor, the same outputs at
    real tokens; save -> bertfast: the same again."""
    reference = hf_model(family, head)
    model = bertfast.from_hf(reference, backend="reference")
    model.save_pretrained(tmp_path)
    auto = getattr(transformers, AUTO_CLASSES[head])
    loaded, info = auto.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert type(loaded) is type(reference)
    assert not any(info.values()), info
    assert_native_matches(model, loaded.eval(), left=True)
    again = getattr(bertfast, "Bert" + head).from_pretrained(tmp_path, backend="reference", strict=True)
    assert_native_matches(again, reference, left=True)


def test_save_pretrained_refuses_a_class_the_family_has_not(tmp_path):
    config = bertfast.BertConfig.from_dict(hf_config("electra").to_dict())
    with pytest.raises(ValueError, match="ElectraForPreTraining ELECTRA's discriminator head has no native class"):
        bertfast.BertForPreTraining(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has a pooler, but transformers' ElectraModel has none"):
        bertfast.BertModel(config, add_pooling_layer=True).save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
