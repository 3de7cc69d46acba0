"""FSDP2 sharding of a stage's models under Lightning's ``ModelParallelStrategy`` (docs/architecture.md, "Sharding").

Each model a stage holds — the trained one and every frozen one (a distillation teacher, RMU's frozen copy) — is
sharded on its own: every decoder layer is one ``fully_shard`` unit, then the model itself (embeddings, final norm,
tied output head). So a unit never mixes frozen and trainable parameters, a frozen model never gets gradients or
optimizer state, and each rank holds ``1/W`` of every model between forwards.

The losses run each model through its own ``forward`` (:func:`~undo_lightning.losses.lm_hidden_states`), so
FSDP's hooks gather and free the parameters as usual; the output head is used right after that forward, while the
root unit's parameters are still gathered (FSDP2 keeps a root's parameters until backward; a frozen root's are freed
at the next forward).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules Hugging Face says must not be split across devices (``_no_split_modules``: the decoder layers).

    Raises:
        ValueError: the model names none, or none of its modules is of a named class.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot shard it layer by layer: it names no decoder-layer class "
                         f"(_no_split_modules={sorted(names)}); FSDP sharding needs a Hugging Face decoder model")
    return layers


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an FSDP2 unit (its forwards are collectives: every rank must run the same number)."""
    return isinstance(model, FSDPModule)


def shard(model: torch.nn.Module, mesh: DeviceMesh) -> torch.nn.Module:
    """Shards ``model`` in place over the data-parallel dimension of ``mesh``: each decoder layer, then the model.

    Idempotent (a sharded model is returned as is), so a stage may call it from ``configure_model`` every time.

    Args:
        model: a Hugging Face ``*ForCausalLM`` with full (unsharded) parameters.
        mesh: Lightning's device mesh (``LightningModule.device_mesh``); its ``"data_parallel"`` dimension is used.

    Returns:
        the same module, now an ``FSDPModule``.
    """
    if is_sharded(model):
        return model
    dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def is_empty(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built on the meta device (shapes, no values)."""
    return any(p.is_meta for p in model.parameters())


def shard_from_rank0(model: torch.nn.Module, mesh: DeviceMesh, device: torch.device) -> torch.nn.Module:
    """Shards ``model`` like :func:`shard` when only rank 0 holds its weights: every other rank holds the same
    architecture on the meta device (``build_model(..., empty=True)``), so no rank but the first ever holds a full
    copy. After sharding, each rank allocates its shards on ``device`` and rank 0's full tensors are broadcast into
    them (``set_model_state_dict(..., broadcast_from_rank0=True)``); buffers, which no state dict holds when they
    are not persistent (e.g. the rotary ``inv_freq``), are broadcast from rank 0 as well.

    A collective: call it on every rank, in the same order for every model.

    Args:
        model: rank 0: the model with its weights (CPU); other ranks: the same model on the meta device.
        mesh: Lightning's device mesh.
        device: where the shards live (the strategy's root device: the broadcast's backend needs it there).

    Returns:
        the same module, sharded, with rank 0's values on every rank.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    first = dist.get_rank() == 0
    full = model.state_dict() if first else {}
    shard(model, mesh)
    if first:
        model.to(device)
    else:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def tensor_parallel_size(mesh: DeviceMesh | None) -> int:
    """The size of the mesh's ``"tensor_parallel"`` dimension (1 when there is none)."""
    if mesh is None or "tensor_parallel" not in (mesh.mesh_dim_names or ()):
        return 1
    return mesh["tensor_parallel"].size()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's full state dict, gathered on rank 0 in CPU memory (an empty dict on other ranks); ``None``
    for a model that is not sharded (its own ``state_dict`` is already full).

    A collective: call it on every rank.
    """
    if not is_sharded(model):
        return None
    # imported here: torch.distributed.checkpoint adds about a second to every command's start-up
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
