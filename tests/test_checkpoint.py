"""The checkpoint loader: real files in, clear errors for bad ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.engine.weights import resolve_path
from diffucode.daemon.errors import CheckpointError
from diffucode.daemon.engine.tiny import write_tiny_checkpoint


@pytest.fixture
def copy_of(tmp_path, tiny_dir):
    def make(name="ckpt"):
        return shutil.copytree(tiny_dir, tmp_path / name)
    return make


def test_loads_with_default_dtype_and_meta_free_weights(tiny_ckpt):
    assert tiny_ckpt.dtype == torch.float32 and tiny_ckpt.device.type == "cpu"
    for name, p in tiny_ckpt.network.state_dict().items():
        assert p.device.type == "cpu", name
    assert tiny_ckpt.tokenizer is not None and tiny_ckpt.mask_id == tiny_ckpt.tokenizer.token_id("<|mask|>")


def test_sharded_bf16_checkpoint_loads_and_dtype_is_selectable(tiny_instruct_dir):
    a = load_checkpoint(tiny_instruct_dir, device="cpu")
    b = load_checkpoint(tiny_instruct_dir, device="cpu", dtype="bfloat16")
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
    assert next(b.network.parameters()).dtype == torch.bfloat16
    ids = torch.arange(3, 20).unsqueeze(0)
    la, lb = a.network(ids).logits, b.network(ids).logits
    assert lb.dtype == torch.float32  # logits are always float32, as the reference casts them
    assert torch.allclose(la, lb, atol=0.1)


def test_same_weights_single_file_or_shards(tmp_path):
    one = load_checkpoint(write_tiny_checkpoint(tmp_path / "one", seed=5), device="cpu")
    three = load_checkpoint(write_tiny_checkpoint(tmp_path / "three", seed=5, shards=3), device="cpu")
    for (n, p), (_, q) in zip(one.network.state_dict().items(), three.network.state_dict().items()):
        assert torch.equal(p, q), n


def test_loads_memory_mapped_without_copies(tiny_dir):
    """With the file's dtype, tensors are assigned from the mmap'd file: nothing is initialised."""
    ckpt = load_checkpoint(tiny_dir, device="cpu", dtype="float32")
    on_disk = load_file(tiny_dir / "model.safetensors")
    for name, p in ckpt.network.state_dict().items():
        assert torch.equal(p, on_disk[name]), name


def test_checkpoint_without_tokenizer_files(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "bare", tokenizer_files=False)
    ckpt = load_checkpoint(path, device="cpu", require_tokenizer=False)
    assert ckpt.tokenizer is None
    with pytest.raises(CheckpointError, match="vocab.json|tokenizer"):
        load_checkpoint(path, device="cpu")


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, tiny_dir, monkeypatch):
    """A hub id is found in a Hugging Face cache laid out as huggingface_hub lays it out."""
    cache = tmp_path / "hub"
    snap = cache / "models--apple--DiffuCoder-7B-cpGRPO" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_dir, snap)
    (cache / "models--apple--DiffuCoder-7B-cpGRPO" / "refs").mkdir()
    (cache / "models--apple--DiffuCoder-7B-cpGRPO" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_path("apple/DiffuCoder-7B-cpGRPO") == snap
    assert load_checkpoint("apple/DiffuCoder-7B-cpGRPO", device="cpu").path == snap
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*diffucode pull apple/Other"):
        resolve_path("apple/Other")


def test_missing_directory_and_files(tmp_path, copy_of):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_checkpoint(tmp_path / "nowhere")
    d = copy_of("noconfig")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(d)
    d = copy_of("noweights")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only safetensors.*never pickles"):
        load_checkpoint(d)


def test_wrong_model_type_is_named(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type 'qwen2'.*expected 'Dream'"):
        load_checkpoint(d)


def test_wrong_shape_names_file_tensor_expected_and_found(copy_of):
    d = copy_of()
    state = load_file(d / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.1.self_attn.k_proj.weight" in msg
    assert "[16, 64]" in msg and "[32, 64]" in msg


def test_missing_and_unexpected_tensors(copy_of):
    d = copy_of("missing")
    state = load_file(d / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors model.norm.weight"):
        load_checkpoint(d)
    d = copy_of("extra")
    state = load_file(d / "model.safetensors")
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected tensor 'model.layers.9.mlp.up_proj.weight'"):
        load_checkpoint(d)


def test_bad_config_values_and_corrupt_files(copy_of):
    d = copy_of("heads")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_attention_heads 4 is not divisible by num_key_value_heads 3"):
        load_checkpoint(d)
    d = copy_of("corrupt")
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a safetensors file \(header of \d+ bytes in a file of 22\)"):
        load_checkpoint(d)
    d = copy_of("json")
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(d)


def test_bad_device_and_dtype(tiny_dir):
    with pytest.raises(CheckpointError, match="dtype 'int3'"):
        load_checkpoint(tiny_dir, device="cpu", dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA is not available"):
            load_checkpoint(tiny_dir, device="cuda")


def test_config_written_by_newer_transformers_loads(copy_of):
    """transformers 5 writes rope settings as rope_parameters and may leave out defaults."""
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    theta = cfg.pop("rope_theta")
    cfg.pop("rope_scaling")
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    cfg["dtype"] = cfg.pop("torch_dtype")
    (d / "config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(d, device="cpu")
    assert ckpt.config.rope_theta == theta and ckpt.config.rope_scaling == {"rope_type": "default"}
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="rope_scaling.*yarn.*not supported"):
        load_checkpoint(d, device="cpu")
