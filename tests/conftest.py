"""Shared fixtures and helpers: one offline models home per test session, fresh tiny pipelines per test,
the one-thread fixture, UNet inputs, concept and adapter-file makers."""

from __future__ import annotations

import os

import pytest
import torch

from bench.support import randomize_concept, trained_looking_adapter  # noqa: F401 - the tests' makers

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, while OpenMP's spin-waiting makes two threads
    10-30x slower whenever other work keeps the machine's cores busy (measured). Modules that need it
    say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unet_inputs(pipe, seed=0):
    """(sample, timesteps, encoder states) for one call of the pipeline's UNet, batch 2."""
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.unet.config
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    states = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500]), states


def unet_output(pipe, inputs):
    with torch.no_grad():
        return pipe.unet(*inputs).sample


def rewrite_safetensors(src, dst, edit_tensors=None, edit_meta=None):
    """Copy a safetensors file with its tensors and / or metadata edited in place by the callbacks."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst
