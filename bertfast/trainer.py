"""``transformers.Trainer`` checkpoints of native bertfast models, with their ``config.json``.

Trainer writes ``config.json`` only for a ``transformers.PreTrainedModel``; a native bertfast
model is not one (it would pay transformers' import on every ``import bertfast``), so its
checkpoints hold the weights, under Hugging Face's names, and no config.  Pass
:class:`CheckpointConfig` to Trainer and every checkpoint gets it, so each loads in plain
transformers and in bertfast (for a final folder, ``model.save_pretrained(folder)``)::

    trainer = transformers.Trainer(model=native, args=args, ..., callbacks=[bertfast.trainer.CheckpointConfig()])

A native model of another family (RoBERTa, ELECTRA, DistilBERT...) is refused when training begins:
Trainer writes its weights under bertfast's BERT names, which transformers would load into the family's
classes wrong and ``resume_from_checkpoint`` needs as they are; ``model.save_pretrained(folder)`` writes
the family's own layout.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .loading import save_config
from .modeling import BertPreTrainedModel

__all__ = ["CheckpointConfig"]


def _native_bert(model):
    """The native model Trainer saves (unwrapped from DistributedDataParallel), or None; refuses another family."""
    model = getattr(model, "module", model)
    if not isinstance(model, BertPreTrainedModel):
        return None
    if model.config.family != "bert":
        raise ValueError(
            f"CheckpointConfig cannot describe Trainer's checkpoints of a native {model.config.family} model: Trainer "
            "writes its weights under bertfast's BERT names, not the family's; save the trained model with "
            "model.save_pretrained(folder), which writes the family's layout"
        )
    return model


class CheckpointConfig(TrainerCallback):
    """Writes the native model's ``config.json`` next to the weights Trainer saved."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _native_bert(model)  # a family model is refused before any step is spent
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        # on_save follows every checkpoint; the main process writes, as Trainer does for its own files.
        model = _native_bert(model)
        if state.is_world_process_zero and model is not None:
            save_config(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control
