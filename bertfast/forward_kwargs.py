"""The extra keyword arguments transformers passes to a model's forward, checked once for every face.

transformers 5's ``Trainer`` passes ``num_items_in_batch`` to any model whose forward takes
``**kwargs`` (or whose class sets ``accepts_loss_kwargs``), and its BERT heads hand their
``**kwargs`` (``TransformersKwargs``) on to the encoder.  Patched and native models accept
what cannot change an encoder's result, and refuse by name what would: a keyword bertfast
does not run must raise, never be dropped silently.
"""

from __future__ import annotations

# Accepted and ignored by the encoder; the reason each is safe to ignore.
IGNORED = {
    "num_items_in_batch": "it normalises a loss: the heads that compute one honour it, the encoder has none",
    "use_cache": "an encoder has no key/value cache",
    "output_router_logits": "BERT has no mixture-of-experts router",
}

# Hugging Face BERT features bertfast does not implement: refused when set.
NOT_IMPLEMENTED = ("head_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values")


def check_forward_kwargs(kwargs: dict, where: str, hint: str) -> None:
    """Raise for any keyword in ``kwargs`` that would change the result; the ones in ``IGNORED`` pass.

    ``where`` names the forward in the message, ``hint`` says what to do instead.  Unknown
    keywords set to ``None`` or ``False`` mean "off" and pass; any other value raises
    ``TypeError`` (transformers' packed-sequence arguments ``cu_seq_lens_q`` etc., say).
    """
    for name in NOT_IMPLEMENTED:
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported by {where} (an encoder without head masking); {hint}")
    known = IGNORED.keys() | set(NOT_IMPLEMENTED)
    unknown = sorted(k for k, v in kwargs.items() if k not in known and v is not None and v is not False)
    if unknown:
        raise TypeError(f"{where} got unsupported arguments: {unknown} (bertfast does not run them); {hint}")
