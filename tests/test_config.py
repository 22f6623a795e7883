"""Config: loading, overrides, and every bad value the issue names raising a message that names the
key, the value and the fix, before anything is compiled."""

import pytest
from helpers import tiny_config

from mtp.cli import resolve_config_path
from mtp.config import ConfigError, apply_overrides, load_config, validate


def test_default_and_named_configs_load_and_validate():
    for name in ("default", "tiny", "ntp_baseline"):
        cfg = load_config(resolve_config_path(name))
        validate(cfg, n_devices=1)
    assert load_config(resolve_config_path("ntp_baseline")).model.n_future == 1
    assert load_config(resolve_config_path(None)).model.n_future == 4


def test_overrides_are_typed():
    cfg = apply_overrides(tiny_config(), ["--config.model.n_future=8", "--config.optim.lr=1",
                                          "--config.loss.head_weights=(1.0, 0.5)",
                                          "--config.loss.impl=vmap"])
    assert cfg.model.n_future == 8 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.head_weights == (1.0, 0.5) and cfg.loss.impl == "vmap"
    with pytest.raises(ConfigError, match="expected a int"):
        apply_overrides(tiny_config(), ["--config.model.n_future=four"])


def test_unknown_key_names_the_closest_match():
    with pytest.raises(ConfigError, match=r"Unknown config key 'model.n_futur'.*model.n_future"):
        apply_overrides(tiny_config(), ["--config.model.n_futur=2"])


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from mtp.config import base_config\n"
                    "def get_config():\n    c = base_config()\n    c.train.stepz = 3\n    return c\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(path)


@pytest.mark.parametrize("overrides, n_devices, message", [
    (["model.n_future=0"], 1, r"model.n_future=0 is invalid: use at least 1 head"),
    (["mesh.data=3"], 8, r"data\*fsdp\*tensor = 3\*1\*1 = 3 but 8 devices"),
    (["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=3"], 8, r"= 12 but 8 devices"),
    (["mesh.data=-1", "mesh.fsdp=-1"], 8, r"at most one of mesh.data/fsdp/tensor may be -1"),
    (["train.batch_size=6", "mesh.data=4", "mesh.fsdp=1"], 4,
     r"train.batch_size=6 is invalid: .* 4 shards; use a multiple of 4"),
    (["train.batch_size=8", "train.grad_accum=3"], 1, r"divisible by train.grad_accum=3"),
    (["train.seq_len=128"], 1, r"train.seq_len=128 is invalid: exceeds model.max_seq_len=64"),
    (["data.vocab_size=512"], 1, r"data.vocab_size=512 is invalid: the tokenizer vocab must equal"
                                 r" model.vocab_size=97"),
    (["model.head_type='mlp'"], 1, r"model.head_type='mlp' is invalid"),
    (["model.n_kv_heads=3"], 1, r"divisible by n_kv_heads"),
    (["loss.impl='fast'"], 1, r"loss.impl='fast' is invalid"),
    (["loss.head_weights=(1.0,)"], 1, r"loss.head_weights has 1 entries but model.n_future=3"),
    (["model.parameter_matched=True"], 1, r"leaving 0"),
])
def test_bad_config_raises_a_clear_message(overrides, n_devices, message):
    cfg = apply_overrides(tiny_config(), overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, n_devices=n_devices)


def test_empty_corpus_is_rejected_before_training(tmp_path, monkeypatch):
    from mtp.train.loop import train

    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    cfg = tiny_config()
    cfg.model.vocab_size = cfg.data.vocab_size = 512
    cfg.data.source = str(tmp_path / "empty")
    cfg.workdir = str(tmp_path / "w")
    with pytest.raises(ValueError, match="data.source"):
        train(cfg)
    assert not (tmp_path / "w" / "checkpoints").exists()
