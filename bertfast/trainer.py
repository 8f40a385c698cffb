"""``transformers.Trainer`` checkpoints of native bertfast models, with their ``config.json``.

Trainer writes ``config.json`` only for a ``transformers.PreTrainedModel``; a native bertfast
model is not one (it would pay transformers' import on every ``import bertfast``), so its
checkpoints hold the weights, under Hugging Face's names, and no config.  Pass
:class:`CheckpointConfig` to Trainer and every checkpoint gets it, so each loads in plain
transformers and in bertfast (for a final folder, ``model.save_pretrained(folder)``)::

    trainer = transformers.Trainer(model=native, args=args, ..., callbacks=[bertfast.trainer.CheckpointConfig()])
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .loading import save_config
from .modeling import BertPreTrainedModel

__all__ = ["CheckpointConfig"]


class CheckpointConfig(TrainerCallback):
    """Writes the native model's ``config.json`` next to the weights Trainer saved."""

    def on_save(self, args, state, control, model=None, **kwargs):
        # on_save follows every checkpoint; the main process writes, as Trainer does for its own files.
        model = getattr(model, "module", model)  # DistributedDataParallel's wrapper
        if state.is_world_process_zero and isinstance(model, BertPreTrainedModel):
            save_config(model, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control
