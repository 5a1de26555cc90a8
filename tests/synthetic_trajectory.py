"""Synthetic trajectories for the sweeps' regression tests: checkpoints drawn from a seeded generator.

    states = perturbed_trajectory(model.state_dict(), epochs=5)    # {1: state, ..., 5: state}

Only the template's keys, shapes and dtypes are used, never its values, so the same trajectory comes out on
every machine whatever the template's weights were (a random init, a trained checkpoint). θ_E = base + E·drift +
noise_E, each tensor scaled like a fresh initialisation (1/√fan-in; norm weights around 1; positive running
variances); integer tensors count 100·E (BatchNorm's num_batches_tracked). tests/data/sweep_*.csv hold the
values the sweep scripts computed on these trajectories before they were built on lawa_sweep, so a test that
sweeps one and calls :func:`assert_matches_reference` shows the results are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"


def _scale(key: str, t: torch.Tensor) -> tuple[float, float]:
    """(centre, spread) of a tensor like ``t``: what a fresh initialisation of that kind of tensor looks like."""
    if key.endswith("running_var"):
        return 1.0, 0.1
    if t.dim() >= 2:
        return 0.0, (t[0].numel()) ** -0.5
    if key.endswith("weight"):
        return 1.0, 0.1
    return 0.0, 0.1


def perturbed_trajectory(template: Mapping[str, torch.Tensor], epochs: int, seed: int = 0) -> dict[int, dict]:
    """``{E: state}`` for E = 1..epochs with the keys, shapes and dtypes of ``template`` (values ignored)."""
    gen = torch.Generator().manual_seed(seed)
    base, drift, noise = {}, {}, {}
    for key, t in template.items():
        if not t.is_floating_point():
            continue
        centre, spread = _scale(key, t)
        base[key] = centre + spread * torch.randn(t.shape, generator=gen)
        drift[key] = 0.05 * spread * torch.randn(t.shape, generator=gen)
        noise[key] = [0.02 * spread * torch.randn(t.shape, generator=gen) for _ in range(epochs)]
    states = {}
    for e in range(1, epochs + 1):
        state = {}
        for key, t in template.items():
            if key in base:
                value = base[key] + e * drift[key] + noise[key][e - 1]
                if key.endswith("running_var"):
                    value = value.abs()
                state[key] = value.to(t.dtype)
            else:
                state[key] = torch.full_like(t, 100 * e)
        states[e] = state
    return states


def write_image_run(folder: Path, arch: str, epochs: int = 5) -> Path:
    """pytorch/examples checkpoints ``checkpoint{E}.pt`` of torchvision's ``arch`` (10 classes) in ``folder``."""
    import torchvision

    folder.mkdir(parents=True)
    template = torchvision.models.get_model(arch, num_classes=10).state_dict()
    for e, state in perturbed_trajectory(template, epochs).items():
        torch.save({"epoch": e, "arch": arch, "state_dict": state}, folder / f"checkpoint{e}.pt")
    return folder


def write_fairseq_run(folder: Path, template: Path, epochs: int = 4, *, every_updates: int | None = None) -> Path:
    """fairseq checkpoints with ``template``'s configuration and synthetic weights: ``checkpoint{E}.pt``, or
    ``checkpoint_1_{U}.pt`` at U = every_updates·i (with the update count in ``optimizer_history``)."""
    folder.mkdir(parents=True)
    obj = torch.load(template, weights_only=False)  # a checkpoint this test session's own training wrote
    for e, state in perturbed_trajectory(obj["model"], epochs).items():
        if every_updates is None:
            torch.save({**obj, "model": state}, folder / f"checkpoint{e}.pt")
            continue
        history = [dict(h) for h in obj["optimizer_history"]]
        history[-1]["num_updates"] = every_updates * e
        name = f"checkpoint_1_{every_updates * e}.pt"
        torch.save({**obj, "model": state, "optimizer_history": history}, folder / name)
    return folder


def assert_matches_reference(results, name: str) -> None:
    """The sweep's rows equal tests/data/sweep_{name}.csv, cell for cell, to float32 rounding."""
    import pandas as pd

    key = ["method", "k", "epoch", "split", "metric"]
    reference = pd.read_csv(DATA / f"sweep_{name}.csv").set_index(key).sort_index()["value"]
    got = results.set_index(key).sort_index()["value"]
    assert list(got.index) == list(reference.index)
    pd.testing.assert_series_equal(got, reference, check_exact=False, rtol=1e-5, atol=1e-6)
