"""bertfast: a custom-kernel performance engine for BERT.

    import bertfast
    model = bertfast.BertModel.from_pretrained("path/to/bert", dtype=torch.bfloat16, device="cuda")
    out = model(input_ids, attention_mask)        # out.last_hidden_state, out.pooler_output

Compute goes through :mod:`bertfast.ops`, whose backends are "reference" (PyTorch),
"triton" (:mod:`bertfast.kernels`) and "ext" (the C++/CUDA extension).
"""

from . import ops
from .config import BertConfig
from .errors import BackendUnavailable
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
    "CheckpointError",
    "__version__",
    "ops",
]
