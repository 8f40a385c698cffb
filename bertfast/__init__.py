"""bertfast: a custom-kernel performance engine for BERT.

    import bertfast
    model = bertfast.BertModel.from_pretrained("path/to/bert", dtype=torch.bfloat16, device="cuda")
    out = model(input_ids, attention_mask)        # out.last_hidden_state, out.pooler_output

Compute goes through :mod:`bertfast.ops`, whose backends are "reference" (PyTorch),
"triton" (:mod:`bertfast.kernels`) and "ext" (the C++/CUDA extension).
"""

from . import ops
from .config import BertConfig
from .cuda_graphs import CUDAGraphRunner, set_graphs
from .errors import BackendUnavailable
from .fp8 import quantize
from .hf import convert as from_hf
from .hf import register_attention
from .loading import CheckpointError
from .modeling import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertPreTrainedModel,
)
from .patching import PatchError, PatchWarning, is_patched, patch, patched_modules, unpatch
from .train_step import TrainStep

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "BertPreTrainedModel",
    "CUDAGraphRunner",
    "CheckpointError",
    "PatchError",
    "PatchWarning",
    "TrainStep",
    "__version__",
    "from_hf",
    "is_patched",
    "ops",
    "patch",
    "patched_modules",
    "quantize",
    "register_attention",
    "set_graphs",
    "unpatch",
]
