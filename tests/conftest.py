"""Shared fixtures: one offline models home per test session, fresh tiny pipelines per test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def models_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("models-home")
    previous = os.environ.get("SPECTRAL_DIFFUSION_HOME")
    os.environ["SPECTRAL_DIFFUSION_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("SPECTRAL_DIFFUSION_HOME", None)
    else:
        os.environ["SPECTRAL_DIFFUSION_HOME"] = previous


@pytest.fixture
def tiny_pipe(models_home):
    from spectral_diffusion.models.registry import load_pipeline

    pipe = load_pipeline("builtin:tiny")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_sdxl_pipe(models_home):
    from spectral_diffusion.models.registry import load_pipeline

    pipe = load_pipeline("builtin:tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def randomize_concept(adapters, name, seed=0, scale=0.05):
    """Give a concept non-zero parameters, as if it had been trained."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.layers.values():
            adapter = layer.concept(name)
            for pname in adapter.trainable_names():
                param = getattr(adapter, pname)
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
        for wrapper in adapters.embeddings.values():
            if name in wrapper.vectors:
                vec = wrapper.vectors[name]
                vec.add_(torch.randn(vec.shape, generator=generator) * scale)
