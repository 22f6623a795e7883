"""Config: loading, overrides, and every bad value the issue names raising a message that names the
key, the value and the fix, before anything is compiled."""

import ast
from pathlib import Path

import ml_collections
import pytest
from helpers import tiny_config

from mtp.cli import resolve_config_path
from mtp.config import ConfigError, ModelConfig, apply_overrides, base_config, load_config, validate
from mtp.model.spec import ModelSpec

ROOT = Path(__file__).resolve().parent.parent


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
    (["loss.draft_vocab=40"], 1, r"loss.draft_vocab=40 is invalid: .*head 1 .* loss.head_weights=\(0, ...\)"),
    (["loss.draft_vocab=40", "loss.head_weights=(0.0, 1.0, 1.0)", "loss.impl='vmap'"], 1,
     r"loss.draft_vocab=40 is invalid: it needs loss.impl='scan'"),
])
def test_bad_config_raises_a_clear_message(overrides, n_devices, message):
    cfg = apply_overrides(tiny_config(), overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, n_devices=n_devices)


# Each override alone makes tiny_config() unusable; the message must name the key (and say why).
@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=0"], "optim.lr=0.0"),
    (["optim.lr=-1"], "optim.lr=-1.0"),
    (["train.batch_size=0"], "train.batch_size=0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every=0"),
    (["train.log_every=0"], "train.log_every=0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints=0"),
    (["model.vocab_size=0"], "model.vocab_size=0"),
    (["optim.clip_norm=-1"], "optim.clip_norm=-1.0"),
    (["model.d_model=0"], "model.d_model=0"),
    (["model.d_model=-8"], "model.d_model=-8"),
    (["model.n_layers=0"], "model.n_layers=0"),
    (["model.head_dim=-2"], "model.head_dim=-2"),
    (["model.d_ff=-1"], "model.d_ff=-1"),
    (["model.max_seq_len=8"], "model.max_seq_len=8"),
    (["model.rope_theta=0"], "model.rope_theta=0.0"),
    (["model.norm_eps=0"], "model.norm_eps=0.0"),
    (["model.init_std=-0.02"], "model.init_std=-0.02"),
    (["model.lora_rank=-1"], "model.lora_rank=-1"),
    (["loss.chunk_size=-1"], "loss.chunk_size=-1"),
    (["loss.geometric_r=-0.5", "loss.weighting='geometric'"], "loss.geometric_r=-0.5"),
    (["loss.head_weights=(1.0, -1.0, 0.0)"], "loss.head_weights=(1.0, -1.0, 0.0)"),
    (["loss.head_weights=(0.0, 0.0, 0.0)"], "loss.head_weights=(0.0, 0.0, 0.0)"),
    (["loss.targets='teacher'"], "loss.targets='teacher'"),
    (["data.val_fraction=1.0"], "data.val_fraction=1.0"),
    (["data.val_fraction=0.0"], "data.val_fraction=0.0"),
    (["data.max_files=-1"], "data.max_files=-1"),
    (["data.tokenizer_max_chars=0"], "data.tokenizer_max_chars=0"),
    (["data.tokenizer='pretrained'"], "data.tokenizer_path=''"),
    (["data.source=''"], "data.source=''"),
    (["data.source='induction'", "data.synthetic_examples=0"], "data.synthetic_examples=0"),
    (["data.source='induction'", "data.synthetic_seed=-1"], "data.synthetic_seed=-1"),
    (["data.source='induction'", "data.induction_pattern_len=0"], "data.induction_pattern_len=0"),
    (["train.steps=0"], "train.steps=0"),
    (["train.eval_every=-1"], "train.eval_every=-1"),
    (["train.eval_batches=0"], "train.eval_batches=0"),
    (["train.grad_accum=0"], "train.grad_accum=0"),
    (["train.trainable='everything'"], "train.trainable='everything'"),
    (["init.new_heads='zeros'"], "init.new_heads='zeros'"),
    (["init.gguf='model.gguf'"], "init.gguf='model.gguf'"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.b1=1.0"], "optim.b1=1.0"),
    (["optim.b2=-0.1"], "optim.b2=-0.1"),
    (["optim.eps=0"], "optim.eps=0.0"),
    (["optim.lr=1e999"], "optim.lr=inf"),
    (["mesh.fsdp=0"], "mesh.fsdp=0"),
    (["mesh.tensor=-2"], "mesh.tensor=-2"),
    (["mesh.dcn_data=0"], "mesh.dcn_data=0"),
    (["sharding.rules=(('batch', 'pipeline'),)"], "sharding.rules"),
    (["sharding.rules=('batch',)"], "sharding.rules"),
    (["perf.peak_flops_per_device=-1"], "perf.peak_flops_per_device=-1.0"),
    (["seed=-1"], "seed=-1"),
    (["name=''"], "name=''"),
])
def test_every_bad_value_is_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(apply_overrides(tiny_config(), overrides), n_devices=1)
    assert key in str(error.value)


def test_a_float_the_schema_needs_must_be_finite():
    cfg = tiny_config()
    cfg.optim.lr = float("nan")
    with pytest.raises(ConfigError, match=r"optim.lr=nan is invalid: use a finite number"):
        validate(cfg, n_devices=1)


def test_wrong_types_and_missing_keys_are_refused():
    """ConfigDict refuses a retyped field, but a section replaced wholesale (a config file, an old
    config.json) is only caught here."""
    for key, value, message in (("d_model", 32.0, r"model.d_model=32.0 is invalid: use an int like 256"),
                                ("n_layers", True, r"model.n_layers=True is invalid: use an int"),
                                ("tie_embeddings", 1, r"model.tie_embeddings=1 is invalid: use True or False")):
        cfg = tiny_config()
        cfg.model = ml_collections.ConfigDict({**cfg.model.to_dict(), key: value})
        with pytest.raises(ConfigError, match=message):
            validate(cfg, n_devices=1)
    cfg = tiny_config()
    cfg.train = ml_collections.ConfigDict({k: v for k, v in cfg.train.items() if k != "keep_checkpoints"})
    with pytest.raises(ConfigError, match=r"lacks train.keep_checkpoints"):
        validate(cfg, n_devices=1)


def test_base_and_every_shipped_config_validate():
    validate(base_config(), n_devices=8)
    fits = {"smollm2_heads": ["mesh.data=4", "mesh.tensor=2"],  # batch 4: 4-way data parallel at most
            "paper_induction": ["mesh.data=4", "mesh.tensor=2"]}  # batch 12: 4-way at most
    names = [p.stem for p in sorted((ROOT / "configs").glob("*.py")) if "def get_config" in p.read_text()]
    assert len(names) >= 12
    for name in names:
        validate(load_config(ROOT / "configs" / f"{name}.py", fits.get(name, [])), n_devices=8)


def test_model_section_is_the_model_config_dataclass():
    assert base_config().model.to_dict() == ModelConfig().__dict__
    old = {k: v for k, v in base_config().model.items() if k not in ("branch_layer", "hidden_mix", "lora_rank",
                                                                      "lora_alpha")}
    spec = ModelSpec.from_config(ml_collections.ConfigDict({**old, "removed_key": 1}))  # an older run
    assert spec == ModelSpec() and spec.lora_alpha == 16.0 and spec.branch_layer == 0


def test_the_schema_imports_nothing_from_the_package():
    tree = ast.parse((ROOT / "mtp" / "config.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n == "mtp" or n.startswith("mtp.")]


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
