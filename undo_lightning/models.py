"""Build, load and export Hugging Face causal LMs (docs/architecture.md).

A model argument is one of: a preset name (``gemma2-tiny``, ``gemma2-0.1b``, ``gemma2-0.3b``: a Gemma-2 built from
config with a seeded init), a local folder written by ``save_pretrained``, or a hub id (needs network access).
"""

from __future__ import annotations

import json
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM, PreTrainedModel

from undo_lightning.io import atomic_folder, is_local_path

# Fields the paper's models inherit from gemma-2-2b (docs/reference.md §2): soft-capping, GeGLU, tied embeddings, RoPE.
_GEMMA2_COMMON = dict(
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    initializer_range=0.02,
    tie_word_embeddings=True,
)

PRESETS: dict[str, dict] = {
    # CPU default (~0.5 M parameters with the arithmetic vocabulary); attention scaled by head_dim as usual.
    "gemma2-tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=1024),
    # Seconds-scale model for tests and smoke runs (~0.15 M parameters).
    "gemma2-micro": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=1024),
    # The paper's sizes (docs/reference.md §2), including the inherited query_pre_attn_scalar=256 and 4 KV heads.
    "gemma2-0.1b": dict(num_hidden_layers=14, hidden_size=320, intermediate_size=1280, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=256, max_position_embeddings=8192),
    "gemma2-0.3b": dict(num_hidden_layers=14, hidden_size=768, intermediate_size=3072, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=256, max_position_embeddings=8192),
}


def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def preset_config(name: str, tokenizer, **overrides) -> Gemma2Config:
    """The ``Gemma2Config`` of preset ``name`` sized to ``tokenizer``'s vocabulary and special tokens."""
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is not a preset; presets: {sorted(PRESETS)}")
    kwargs = {**_GEMMA2_COMMON, **PRESETS[name], **overrides}
    return Gemma2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def build_model(model: str, tokenizer=None, seed: int = 0, attn_implementation: str = "eager",
                trust_remote_code: bool = False, empty: bool = False, **overrides) -> PreTrainedModel:
    """Returns the causal LM named by ``model``.

    With ``empty``, the same architecture in float32 on the meta device (no weights read, no memory): what the ranks
    but the first build when a sharded model is loaded once and broadcast
    (:func:`~undo_lightning.sharding.shard_from_rank0`).

    Args:
        model: preset name, local ``save_pretrained`` folder, or hub id.
        tokenizer: tokenizer the data uses; sizes presets and is checked against loaded models.
        seed: seed of a preset's random initialisation (the authors' code leaves it unseeded, docs/reference.md §13).
        attn_implementation: ``eager`` by default, which Gemma-2's soft-capping needs.
        trust_remote_code: only when the user asks for it.
        overrides: extra config fields for presets (e.g. ``num_hidden_layers=1`` in tests).

    Raises:
        ValueError: unknown preset, missing folder, or a vocabulary that does not fit the tokenizer.
    """
    if model in PRESETS:
        if tokenizer is None:
            raise ValueError(f"model={model!r} is a preset: a tokenizer is needed to size its vocabulary")
        config = preset_config(model, tokenizer, **overrides)
        config._attn_implementation = attn_implementation
        if empty:
            return _empty(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Gemma2ForCausalLM(config)
    if is_local_path(model) and not is_hf_folder(model):
        raise ValueError(f"model={model!r}: no Hugging Face model folder there (no config.json). Expected a preset "
                         f"{sorted(PRESETS)}, a folder written by save_pretrained, or a hub id")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
        kwargs = {"attn_implementation": attn_implementation} if config.model_type.startswith("gemma") else {}
        if empty:
            loaded = _empty(config, trust_remote_code=trust_remote_code, **kwargs)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code,
                                                          dtype=torch.float32, **kwargs)
    except OSError as err:
        raise ValueError(f"model={model!r} is neither a preset {sorted(PRESETS)} nor a local folder, and loading it as "
                         f"a hub id failed ({err.__class__.__name__}: {str(err)[:200]}). Offline, pass a local folder "
                         "instead of a hub id.") from None
    if tokenizer is not None:
        check_vocabulary(loaded, tokenizer, model)
    return loaded


def _empty(config, **kwargs) -> PreTrainedModel:
    """The model of ``config`` in float32 on the meta device (shapes only)."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)


def check_vocabulary(model: PreTrainedModel, tokenizer, name: str) -> None:
    """Raises if ``tokenizer``'s ids do not fit ``model``'s embedding, or the folder ships a different tokenizer."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"model={name!r} has vocab_size={model.config.vocab_size} but the tokenizer has "
                         f"{len(tokenizer)} tokens; use the tokenizer the model was trained with")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer.json")):
        with open(os.path.join(name, "tokenizer.json")) as f:
            shipped = json.load(f)["model"].get("vocab")
        if isinstance(shipped, dict) and shipped != tokenizer.get_vocab() and len(shipped) == len(tokenizer):
            raise ValueError(f"model={name!r} ships a tokenizer whose vocabulary differs from the data's tokenizer")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, tied tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def export_model(model: PreTrainedModel, tokenizer, out_dir: str, state_dict: dict | None = None) -> str:
    """Writes ``save_pretrained`` (safetensors) + tokenizer to ``out_dir`` atomically.

    ``state_dict`` replaces the model's own tensors (a sharded model's gathered full state dict).

    The files go to a temporary sibling folder that is renamed into place last
    (:func:`undo_lightning.io.atomic_folder`), so ``out_dir`` either holds a whole export or does not exist: a later
    stage can never pick up a half-written model.

    Returns:
        ``out_dir``.
    """
    if state_dict is not None:  # a gathered dict holds tied weights twice; the model's own would hold them once
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        state_dict = {key: value for key, value in state_dict.items() if key not in tied}
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(out_dir)
