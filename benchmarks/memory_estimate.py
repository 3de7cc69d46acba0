"""Memory per GPU of each stage's model states, from arithmetic on parameter counts (nothing is trained or loaded).

    python benchmarks/memory_estimate.py                 # gemma-2-2b and the paper's 0.3B (vocabulary 256 000)
    python benchmarks/memory_estimate.py --gpus 1,8,64

Counts come from the models' configurations instantiated on the meta device (no weights, no download). Per GPU:

* a trained model: fp32 weights 4 B + fp32 gradients 4 B + AdamW's two fp32 moments 8 B per parameter
  (``bf16-mixed`` keeps fp32 weights and casts per operation); DDP adds its fp32 gradient buckets (4 B per
  parameter, Lightning's default ``gradient_as_bucket_view=False``) and replicates everything on every GPU;
* a frozen model (distillation teacher, RMU's frozen copy): fp32 weights, 4 B per parameter;
* FSDP2 (``configs/strategies/fsdp.yaml``): each of those divided by the GPU count, plus the largest unit gathered
  at once (for these models the root unit: the 256k-token embedding, tied with the output head): its fp32 weights,
  and for a trained model its unsharded gradient before the reduce-scatter.

Not counted: activations (they scale with micro-batch and sequence; ``benchmarks/gpu_check.py`` measures peaks on
a GPU), temporary buffers, the CUDA context. For scale, the last line gives the full-vocabulary logits a loss on
``[B, T, V]`` would add per model, which the stages never materialise (docs/architecture.md, "Losses").
"""

from __future__ import annotations

import argparse

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from undo_lightning.models import _GEMMA2_COMMON, PRESETS, count_parameters

GEMMA_2_2B = dict(num_hidden_layers=26, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, max_position_embeddings=8192)
VOCAB = 256000

#: stage -> (trained models, frozen models)
STAGES = {"pretrain / relearn": (1, 0), "unlearn GradDiff, MaxEnt": (1, 0), "unlearn RMU": (1, 1), "distill": (1, 1)}

GIB = 2**30


def shapes(name: str) -> tuple[int, int]:
    """(parameters, parameters of the largest FSDP unit) of a model, counted on the meta device."""
    sizes = GEMMA_2_2B if name == "gemma-2-2b" else PRESETS[name]
    config = Gemma2Config(vocab_size=VOCAB, **{**_GEMMA2_COMMON, **sizes})
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    layer = count_parameters(model.model.layers[0])
    total = count_parameters(model)
    root = total - layer * config.num_hidden_layers  # embedding (tied head) + final norm
    return total, max(layer, root)


def per_gpu(params: int, largest: int, trained: int, frozen: int, gpus: int, fsdp: bool) -> float:
    """Bytes of model states on one GPU (see the module docstring)."""
    if not fsdp:
        return params * (trained * (16 + (4 if gpus > 1 else 0)) + frozen * 4)
    gathered = (trained * 8 + frozen * 4) * largest if gpus > 1 else 0  # one unit's weights (+ grads) unsharded
    return params * (trained * 16 + frozen * 4) / gpus + gathered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gemma-2-2b,gemma2-0.3b")
    parser.add_argument("--gpus", default="1,8", help="comma-separated GPU counts")
    parser.add_argument("--batch", type=int, default=10, help="micro-batch per GPU, for the logits line")
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    gpus = [int(g) for g in args.gpus.split(",")]
    columns = [(g, False) for g in gpus] + [(g, True) for g in gpus if g > 1]
    header = " | ".join(f"{g} GPU{'s' if g > 1 else ''} {'FSDP' if fsdp else ('DDP' if g > 1 else '')}".strip()
                        for g, fsdp in columns)
    print("Model states per GPU, GiB (arithmetic: fp32 weights, gradients and AdamW moments; activations excluded)\n")
    print(f"| model | parameters | stage | {header} |")
    print("|---|---:|---|" + "---:|" * len(columns))
    for name in args.models.split(","):
        params, largest = shapes(name)
        for stage, (trained, frozen) in STAGES.items():
            cells = " | ".join(f"{per_gpu(params, largest, trained, frozen, g, fsdp) / GIB:.1f}" for g, fsdp in columns)
            print(f"| {name} | {params / 1e9:.2f} B | {stage} | {cells} |")
    logits = args.batch * args.seq * VOCAB * 4
    print(f"\nNot held by the stages: fp32 logits of {args.batch} x {args.seq} tokens x {VOCAB} = "
          f"{logits / GIB:.1f} GiB per model, for each of student and teacher, before the gradient of the loss "
          "doubles it.")


if __name__ == "__main__":
    main()
