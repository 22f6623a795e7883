"""``mtp bench train`` prints one JSON row per (n_future, loss_impl) whose numbers agree with each
other and with ModelSpec, and the memory-flat loss keeps peak memory flat as heads are added."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_device_env

from mtp.config import load_config
from mtp.model.spec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"n_future", "loss_impl", "step_time_s", "tokens_per_s", "flops_per_s", "mfu", "peak_bytes"}
PEAK = 1e12  # FLOP/s per device, set so the MFU is checkable (and the CPU peak is not measured)


def test_bench_train_json_rows():
    env = one_device_env()
    proc = subprocess.run([sys.executable, "-m", "mtp.cli", "bench", "train", "--config", "tiny",
                           "--heads", "1,4", "--impls", "vmap,scan", "--steps", "1", "--json",
                           f"--config.perf.peak_flops_per_device={PEAK}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(r["n_future"], r["loss_impl"]) for r in rows] == [(1, "vmap"), (1, "scan"), (4, "vmap"), (4, "scan")]
    cfg = load_config(REPO / "configs" / "tiny.py")
    tokens = cfg.train.batch_size * cfg.train.seq_len
    for r in rows:
        assert FIELDS <= set(r)
        cfg.model.n_future = r["n_future"]
        spec = ModelSpec.from_config(cfg.model)
        assert r["param_count"] == spec.param_count()
        assert r["tokens_per_s"] == pytest.approx(tokens / r["step_time_s"], rel=1e-9)
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * spec.flops_per_token(cfg.train.seq_len),
                                                 rel=1e-9)
        assert r["peak_flops"] == PEAK and r["mfu"] == pytest.approx(r["flops_per_s"] / PEAK, rel=1e-9)
        # train state = float32 params + AdamW's two moments (+ a few scalar step counters)
        assert 12 * spec.param_count() <= r["state_bytes"] < 12 * spec.param_count() + 64, r
    vmap = {r["n_future"]: r["peak_bytes"] for r in rows if r["loss_impl"] == "vmap"}
    scan = {r["n_future"]: r["peak_bytes"] for r in rows if r["loss_impl"] == "scan"}
    # memory-flat: the scan loss never needs more temporary memory than materializing every head's
    # logits at once, and adding heads grows it by a small fraction of what vmap's grows
    assert all(scan[n] <= vmap[n] for n in (1, 4)), (scan, vmap)
    assert vmap[4] > vmap[1]
    assert scan[4] - scan[1] < 0.25 * (vmap[4] - vmap[1]), (scan, vmap)


def test_peers_rounds_keep_each_engines_best_round_and_every_rounds_identity():
    """mtp bench peers --rounds: the faster round's row counts, every round's speed is kept, and
    'identical to our greedy' must hold in all rounds."""
    from mtp.bench.peers_bench import _faster

    row = None
    for tps, same in ((50.0, True), (70.0, False), (60.0, True)):
        row = _faster(row, {"tokens_per_s": tps, "tokens_per_forward": 1.4, "identical_to_mtp_greedy": same}, 3)
    assert row["tokens_per_s"] == 70.0 and row["tokens_per_s_rounds"] == [50.0, 70.0, 60.0]
    assert row["identical_to_mtp_greedy"] is False
    skipped = {"skipped": "llama-cpp-python not installed"}
    assert _faster(None, skipped, 3) == skipped
    assert _faster(None, {"tokens_per_s": 5.0}, 1) == {"tokens_per_s": 5.0}


def test_peers_rows_time_the_decode_steps_apart_from_the_prefill(monkeypatch):
    """The greedy rows also report the decode loop's own rate (a 1-token generation of each prompt
    timed as its prefill), and the table shows it against the roofline beside the whole rate."""
    import types

    from helpers import tiny_model

    from mtp.bench import peers_bench
    from mtp.bench.peers_bench import _run_ours, format_table
    from mtp.decode.api import PAD_TO
    from mtp.decode.generate import DecodeConfig, generate

    real_best_time = peers_bench._best_time

    def fixed_time(loaded, ids, dc, repeats):  # real generations, fixed clock: 0.5 s prefill, 2 s in all
        return (0.5 if dc.max_new_tokens == 1 else 2.0), real_best_time(loaded, ids, dc, repeats)[1]

    monkeypatch.setattr(peers_bench, "_best_time", fixed_time)
    model = tiny_model(seed=1)
    prompts, dc = [[5, 6, 7], [8, 9]], DecodeConfig("greedy", max_new_tokens=6)
    row, outs = _run_ours(types.SimpleNamespace(model=model), prompts, dc, 1, decode_rate=True)
    assert outs == [generate(model, [p], dc, pad_to=PAD_TO).tokens[0] for p in prompts]
    assert [len(o) for o in outs] == [6, 6] and row["tokens_per_forward"] == 1.0
    assert row["tokens_per_s"] == pytest.approx(12 / (2 * 2.0))  # 12 tokens in 2 generations of 2 s
    assert row["decode_tokens_per_s"] == pytest.approx((12 - 2) / (2 * 2.0 - 2 * 0.5))  # minus prefills
    row.update(roofline_tokens_per_s=1e6, fraction_of_roofline=row["tokens_per_s"] / 1e6, step_bytes=1000,
               decode_fraction_of_roofline=row["decode_tokens_per_s"] / 1e6)
    text = format_table({"rows": {"mtp greedy": row}, "read_bandwidth_gb_s": 1.0})
    assert "decode steps alone" in text and "mtp greedy" in text


def test_bench_train_parameter_matched_json():
    """--parameter-matched times n=4 on n_layers-3 trunk layers against n=1 on n_layers in one run; the
    --config.* override (n_layers=4) reaches both rows."""
    env = one_device_env()
    proc = subprocess.run([sys.executable, "-m", "mtp.cli", "bench", "train", "--config", "tiny",
                           "--parameter-matched", "--steps", "1", "--json", "--config.model.n_layers=4",
                           f"--config.perf.peak_flops_per_device={PEAK}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    one, four = out["rows"]
    assert (one["n_future"], one["trunk_layers"]) == (1, 4) and (four["n_future"], four["trunk_layers"]) == (4, 1)
    cfg = load_config(REPO / "configs" / "tiny.py", ["--config.model.n_layers=4"])
    assert one["loss_impl"] == four["loss_impl"] == cfg.loss.impl
    pm = out["parameter_matched"]
    assert pm["n_future"] == [1, 4] and pm["trunk_layers"] == [4, 1]
    assert pm["step_time_ratio"] == four["step_time_s"] / one["step_time_s"]
    counts = []
    for r, matched in ((one, False), (four, True)):
        cfg.model.n_future, cfg.model.parameter_matched = r["n_future"], matched
        counts.append(ModelSpec.from_config(cfg.model).param_count())
        assert r["param_count"] == counts[-1]
    assert pm["param_count"] == counts and counts[0] == counts[1]  # the matching's point: same size
    assert "parameter-matched: n=4 on 1 trunk layer(s)" in proc.stderr


def test_parameter_matched_n_follows_heads_and_nonsense_is_refused(capsys):
    """--heads 2 compares n=2 on n_layers-1 trunk layers; several --heads, --heads 1, a trunk left
    with no layer and heads that are not layers are refused with a message (exit 2), before timing."""
    from mtp.bench.train_bench import parameter_matched_configs
    from mtp.cli import main
    from mtp.config import ConfigError

    cfg = load_config(REPO / "configs" / "tiny.py")  # n_layers 2
    one, two = (ModelSpec.from_config(c.model) for c in parameter_matched_configs(cfg, 2, "scan"))
    assert (one.n_future, one.trunk_layers, two.n_future, two.trunk_layers) == (1, 2, 2, 1)
    assert one.param_count() == two.param_count()
    for argv, says in ((["--heads", "1,4"], "give one --heads N >= 2 (got --heads 1,4)"),
                       (["--heads", "1"], "give one --heads N >= 2"),
                       (["--impls", "vmap,scan"], "give one --impls value"),
                       ([], "parameter_matched removes n_future-1=3 trunk layers, leaving -1"),
                       (["--config.model.n_layers=4", "--config.model.head_type=linear"],
                        "model.head_type='linear' is invalid for --parameter-matched")):
        with pytest.raises(SystemExit) as e:
            main(["bench", "train", "--config", "tiny", "--parameter-matched", *argv])
        assert e.value.code == 2 and says in str(e.value), (argv, str(e.value))
    with pytest.raises(ConfigError, match="n >= 2"):
        parameter_matched_configs(cfg, 1, "scan")


def test_peers_measures_float32_weights_and_int8_activations_through_settings():
    """mtp bench peers' extra greedy rows for a packed model are settings, not environment variables."""
    from mtp.bench.peers_bench import packed_variants
    from mtp.config import DecodeSettings

    base = DecodeSettings(kernel_threads=2)
    (float_label, floats), (int8_label, int8) = packed_variants(base)
    assert "float32 weights" in float_label and floats == DecodeSettings(kernel_threads=2, packed_weights=False)
    assert "int8 activations" in int8_label and int8 == DecodeSettings(kernel_threads=2, packed_activations="int8")
