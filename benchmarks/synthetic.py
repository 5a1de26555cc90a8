"""Synthetic weights with real models' tensor names and shapes, and realistic magnitudes.

Magnitudes matter for the equality checks: a max-abs-difference limit of 1e-6 means something only for values
of the size real weights have (He-initialised conv/linear weights, BatchNorm scales near 1), not for N(0, 1).
"""

from __future__ import annotations

import math

import torch

# name -> (shape, dtype)
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


def torchvision_layout(arch: str) -> tuple[Layout, list[str]]:
    """State-dict layout of a torchvision model (built on the meta device: no memory, no init time) and the
    names of its parameters in ``model.parameters()`` order (an optimizer's state indices)."""
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    layout = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    return layout, [name for name, _ in model.named_parameters()]


def tiny_cnn_layout() -> tuple[Layout, list[str]]:
    """A few conv/BN/fc tensors (≈10k floats) for --quick runs, without importing torchvision."""
    layout: Layout = {}
    for i, (cin, cout) in enumerate([(3, 8), (8, 16), (16, 16)]):
        layout[f"layer{i}.conv.weight"] = ((cout, cin, 3, 3), torch.float32)
        for name in ("weight", "bias", "running_mean", "running_var"):
            layout[f"layer{i}.bn.{name}"] = ((cout,), torch.float32)
        layout[f"layer{i}.bn.num_batches_tracked"] = ((), torch.int64)
    layout["fc.weight"] = ((10, 16), torch.float32)
    layout["fc.bias"] = ((10,), torch.float32)
    return layout, [k for k in layout if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


def roberta_layout(vocab: int, dim: int, ffn: int, layers: int, positions: int = 514) -> tuple[Layout, list[str]]:
    """fairseq RoBERTa encoder names (``encoder.sentence_encoder.*``, ``encoder.lm_head.*``), all parameters."""
    f32 = torch.float32
    pre = "encoder.sentence_encoder."
    layout: Layout = {
        pre + "embed_tokens.weight": ((vocab, dim), f32),
        pre + "embed_positions.weight": ((positions, dim), f32),
        pre + "layernorm_embedding.weight": ((dim,), f32),
        pre + "layernorm_embedding.bias": ((dim,), f32),
    }
    for i in range(layers):
        p = f"{pre}layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            layout[p + f"self_attn.{proj}.weight"] = ((dim, dim), f32)
            layout[p + f"self_attn.{proj}.bias"] = ((dim,), f32)
        layout[p + "self_attn_layer_norm.weight"] = ((dim,), f32)
        layout[p + "self_attn_layer_norm.bias"] = ((dim,), f32)
        layout[p + "fc1.weight"] = ((ffn, dim), f32)
        layout[p + "fc1.bias"] = ((ffn,), f32)
        layout[p + "fc2.weight"] = ((dim, ffn), f32)
        layout[p + "fc2.bias"] = ((dim,), f32)
        layout[p + "final_layer_norm.weight"] = ((dim,), f32)
        layout[p + "final_layer_norm.bias"] = ((dim,), f32)
    layout["encoder.lm_head.bias"] = ((vocab,), f32)
    layout["encoder.lm_head.dense.weight"] = ((dim, dim), f32)
    layout["encoder.lm_head.dense.bias"] = ((dim,), f32)
    layout["encoder.lm_head.layer_norm.weight"] = ((dim,), f32)
    layout["encoder.lm_head.layer_norm.bias"] = ((dim,), f32)
    return layout, list(layout)


def numel(layout: Layout) -> int:
    return sum(math.prod(shape) for shape, _ in layout.values())


def nbytes(layout: Layout) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())


def _center_and_scale(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """Typical value and spread of a trained tensor of this name/shape (He init for weight matrices)."""
    if len(shape) >= 2:
        return 0.0, math.sqrt(2.0 / math.prod(shape[1:]))
    if name.endswith(("weight", "running_var")):  # 1-D: BatchNorm/LayerNorm scales and variances
        return 1.0, 0.1
    return 0.0, 0.05


def center(layout: Layout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A 'trained model': one draw of every floating tensor at its typical magnitude."""
    out = {}
    for name, (shape, dtype) in layout.items():
        if dtype.is_floating_point:
            mean, scale = _center_and_scale(name, shape)
            out[name] = torch.randn(shape, generator=gen, dtype=dtype).mul_(scale).add_(mean)
    return out


def snapshot(
    layout: Layout, base: dict[str, torch.Tensor], step: int, gen: torch.Generator, spread: float = 0.1
) -> dict[str, torch.Tensor]:
    """One point of a trajectory around ``base``: each floating tensor moved by ``spread`` × its scale;
    integer tensors (``num_batches_tracked``) set to ``step``."""
    out = {}
    for name, (shape, dtype) in layout.items():
        if dtype.is_floating_point:
            _, scale = _center_and_scale(name, shape)
            out[name] = torch.randn(shape, generator=gen, dtype=dtype).mul_(spread * scale).add_(base[name])
        else:
            out[name] = torch.full(shape, step, dtype=dtype)
    return out


def like(layout: Layout, names: list[str], gen: torch.Generator, scale: float) -> list[torch.Tensor]:
    """Random tensors shaped like ``names`` (optimizer state: momentum, Adam moments)."""
    return [torch.randn(layout[n][0], generator=gen).mul_(scale) for n in names]
