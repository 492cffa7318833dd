"""Shared fixtures: tiny real checkpoints, written once per test session to temp dirs."""

import pytest

from diffucode.daemon.engine.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A Base-style checkpoint: 2 layers, GQA 4/2 heads, one model.safetensors."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def tiny_instruct_dir(tmp_path_factory):
    """An Instruct-style checkpoint (has <|dlm_pad|>), sharded in 3 files, bf16 on disk."""
    import torch

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-instruct"), instruct=True, shards=3,
                                 dtype=torch.bfloat16, seed=1)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_dir):
    from diffucode.daemon.engine.checkpoint import load_checkpoint

    return load_checkpoint(tiny_dir, device="cpu")


@pytest.fixture(scope="session")
def tasks(tiny_ckpt):
    from diffucode.daemon.engine.tasks import Tasks

    return Tasks(tiny_ckpt)
