"""LoRA adapters (daemon/engine/lora.py) on a tiny real checkpoint: a fresh adapter changes
nothing, `disabled` gives the base back, the files round-trip through our loader and through
peft (which reads them as its own and computes the same logits), and a wrong adapter is refused
with a message naming what does not fit."""

import copy
import json

import pytest
import torch

from diffucode.daemon.engine import lora
from diffucode.daemon.engine.checkpoint import load_checkpoint
from diffucode.daemon.errors import InputError


@pytest.fixture()
def net(tiny_dir):
    return load_checkpoint(tiny_dir, device="cpu").network


def _randomise(network):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.lora_parameters(network):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_fresh_adapter_changes_nothing_and_disabled_restores_the_base(net):
    x = torch.randint(0, net.config.vocab_size, (2, 10))
    base = net(x).logits
    names = lora.attach(net, lora.LoraSettings(rank=4))
    assert len(names) == 7 * net.config.num_hidden_layers
    assert torch.equal(net(x).logits, base)  # B starts at zero
    _randomise(net)
    assert not torch.allclose(net(x).logits, base)
    with lora.disabled(net):
        assert torch.equal(net(x).logits, base)
    lora.detach(net)
    assert torch.equal(net(x).logits, base) and not lora.attached(net)


def test_only_the_adapter_trains(net):
    lora.attach(net, lora.LoraSettings(rank=2, targets=("q_proj", "v_proj")))
    trainable = lora.lora_parameters(net)
    assert len(trainable) == 2 * 2 * net.config.num_hidden_layers
    assert all(p.shape[0] == 2 or p.shape[1] == 2 for p in trainable)


def test_files_round_trip_and_peft_reads_them(net, tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    plain = copy.deepcopy(net)
    x0 = torch.randint(0, net.config.vocab_size, (1, 12))
    base = plain(x0).logits
    settings = lora.LoraSettings(rank=4, alpha=8.0)
    lora.attach(net, settings)
    _randomise(net)
    x = x0
    want = net(x).logits
    assert not torch.allclose(want, base)
    folder = lora.save_adapter(net, tmp_path / "adapter", settings, "f" * 64, str(tiny_dir), {"steps": [{"reward": 1.5}]})
    config = json.loads((folder / lora.CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0

    ours = load_checkpoint(tiny_dir, device="cpu").network
    info = lora.load_adapter(ours, folder, "f" * 64)
    assert torch.allclose(ours(x).logits, want, atol=1e-6)
    assert info.summary()["steps"] == 1 and info.summary()["last_reward"] == 1.5

    theirs = peft.PeftModel.from_pretrained(plain, str(folder))
    got = theirs(x).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_load_replaces_an_attached_adapter(net, tmp_path, tiny_dir):
    lora.attach(net, lora.LoraSettings(rank=4))
    _randomise(net)
    folder = lora.save_adapter(net, tmp_path / "a", lora.LoraSettings(rank=4), "", str(tiny_dir))
    lora.load_adapter(net, folder, None)  # onto a network that carries one already: swapped, not stacked
    lora.load_adapter(net, folder, None)
    assert sum(1 for _ in lora._wrapped(net)) == 7 * net.config.num_hidden_layers


def test_wrong_adapters_are_refused_by_name(net, tmp_path, tiny_dir):
    with pytest.raises(InputError, match="not a LoRA adapter folder"):
        lora.load_adapter(net, tmp_path, None)
    other = load_checkpoint(tiny_dir, device="cpu").network
    lora.attach(other, lora.LoraSettings(rank=4))
    folder = lora.save_adapter(other, tmp_path / "a", lora.LoraSettings(rank=4), "a" * 64, str(tiny_dir))
    with pytest.raises(InputError, match="trained on base weights sha256 aaaaaaaaaaaa"):
        lora.load_adapter(net, folder, "b" * 64)
    config = json.loads((folder / lora.CONFIG_FILE).read_text())
    (folder / lora.CONFIG_FILE).write_text(json.dumps(config | {"r": 8}))
    with pytest.raises(InputError, match="expected"):
        lora.load_adapter(net, folder, None)
    (folder / lora.CONFIG_FILE).write_text(json.dumps(config | {"r": 0}))
    with pytest.raises(InputError, match=r"rank must be an integer in \[1, 256\], got 0"):
        lora.load_adapter(net, folder, None)
    assert not lora.attached(net)  # nothing half-applied


def test_weights_sha256_is_the_files_hash(tiny_dir, tmp_path, monkeypatch):
    import hashlib
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    files = sorted(tiny_dir.glob("*.safetensors"))
    h = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    assert lora.weights_sha256(tiny_dir) == h
    assert lora.weights_sha256(tiny_dir) == h  # from the cache
    assert (tmp_path / "diffucode" / "sha256.json").is_file()
