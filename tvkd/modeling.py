"""What the library assumes about a loaded causal LM, checked and used in one place.

The trainer and the teacher pass never compute full [tokens × vocab] logits: they run the decoder
and apply the output head themselves to the positions they need (`tvkd.logps.linear_logps`,
`tvkd.values.teacher_signals`). That is exact only when the model's logits are its decoder's last
hidden states times a plain `nn.Linear` head (the teacher pass also reproduces Gemma-style logit
soft-capping), so both refuse a model whose config transforms the logits otherwise
(`head_problem`, one attribute list for both). Also here: the model inside a peft wrapper, the
decoder's hidden states, the device a model lives on, the padding id batches use, and the two
training-time switches (dropout off, activation checkpointing).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import Tensor

from tvkd.config import ConfigError, TrainConfig

# Config attributes of heads that scale the logits of a linear head (1 or None: no scaling).
LOGIT_SCALE_ATTRS = ("logit_scale", "logits_scaling", "output_logits_scale", "mup_width_multiplier")
# Gemma-style soft-cap: logits = cap · tanh(logits / cap) (None or 0: none).
SOFTCAP_ATTR = "final_logit_softcapping"
# transformers renamed gradient_checkpointing_enable to activation_checkpointing_enable in 5.23
# (the old name stays as a deprecated alias until v6).
_ACTIVATION_CHECKPOINTING_RENAMED = Version(transformers.__version__) >= Version("5.23")


def unwrap(model: Any) -> Any:
    """The Hugging Face model inside a peft wrapper (or the model itself)."""
    peft = sys.modules.get("peft")  # never imported: the model cannot be a peft wrapper
    return model.get_base_model() if peft is not None and isinstance(model, peft.PeftModel) else model


def softcap_of(model: Any) -> float | None:
    """The model's final-logit soft-cap, or None when it has none."""
    return getattr(unwrap(model).config, SOFTCAP_ATTR, None) or None


def head_problem(model: Any, *, softcap_ok: bool) -> str | None:
    """Why `model`'s logits are not decoder hidden states × a plain `nn.Linear` head (+ the
    soft-cap when `softcap_ok`), or None when they are. Config attributes are read by name
    because model families declare different ones."""
    core = unwrap(model)
    for attr in LOGIT_SCALE_ATTRS:
        value = getattr(core.config, attr, None)
        if value not in (None, 1, 1.0):
            return f"{attr}={value!r} in the config: its logits are not a plain linear head"
    softcap = softcap_of(core)
    if softcap is not None and not softcap_ok:
        return f"{SOFTCAP_ATTR}={softcap!r} in the config: logits soft-capped, not a plain linear head"
    head = core.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"the output head is {type(head).__name__}, not a plain nn.Linear"
    if core.get_decoder() is core:
        return f"cannot find the decoder of {type(core).__name__}"
    return None


def check_trainable_head(model: Any) -> None:
    """Raise `ConfigError` when the trainer cannot compute `model`'s log-probs from its head
    (`head_problem`, no soft-cap), naming LoRA on the head when that is the cause."""
    problem = head_problem(model, softcap_ok=False)
    if problem is None:
        return
    if unwrap(model) is not model and problem.startswith("the output head"):
        raise ConfigError("lora_target_modules", f"{problem}: do not put LoRA on lm_head")
    raise ConfigError("student", f"{problem} (the trainer computes log-probs from a plain linear head)")


def output_head(model: Any) -> tuple[Any, Tensor, Tensor | None]:
    """(decoder module, head weight [V, H], head bias [V] or None). Check `head_problem` first."""
    core = unwrap(model)
    head = core.get_output_embeddings()
    return core.get_decoder(), head.weight, head.bias


def decoder_hidden(
    decoder: Any, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None = None
) -> Tensor:
    """The decoder's last hidden states [B, L, H] (no KV cache).

    Packed rows (several sequences back to back in one row, no padding) pass attention_mask=None
    and position_ids restarting at 0 at each sequence: transformers then keeps each sequence's
    attention within itself (a block-diagonal causal mask for sdpa/eager/flex attention,
    variable-length kernels for flash attention)."""
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state


def model_device(model: Any) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def pad_token_id(tokenizer: Any) -> int:
    """The id batches are right-padded with: pad, else EOS, else 0. Any id would do (padded
    positions are masked and never read); `tvkd.models.load_tokenizer` always sets a pad token."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere, as TRL does for DPO: π_θ − π_ref must compare the same function,
    and dropout noise in one of them biases the log-ratio. (LoRA dropout, added later, stays.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def set_activation_checkpointing(model: Any, enable: bool) -> None:
    """Turn activation (gradient) checkpointing on or off. Non-reentrant: gradients reach LoRA
    adapters without forcing grads on the inputs."""
    core = unwrap(model)
    kwargs = {"use_reentrant": False}
    if _ACTIVATION_CHECKPOINTING_RENAMED:
        if enable:
            core.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            core.activation_checkpointing_disable()
    elif enable:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        core.gradient_checkpointing_disable()


def add_lora(model: Any, config: TrainConfig) -> Any:
    """`model` wrapped with peft LoRA adapters as the training config asks (rank, alpha, dropout,
    target modules); only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
