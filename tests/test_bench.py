"""``mtp bench train`` prints one JSON row per (n_future, loss_impl) with every field."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"n_future", "loss_impl", "step_time_s", "tokens_per_s", "flops_per_s", "mfu", "peak_bytes"}


def test_bench_train_json_rows():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "mtp.cli", "bench", "train", "--config", "tiny",
                           "--heads", "2", "--impls", "vmap,scan", "--steps", "1", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(r["n_future"], r["loss_impl"]) for r in rows] == [(2, "vmap"), (2, "scan")]
    for r in rows:
        assert FIELDS <= set(r)
        assert r["step_time_s"] > 0 and r["peak_bytes"] > 0 and 0 < r["mfu"] < 1
    # the memory-flat loss never needs more temporary memory than materializing all heads' logits
    assert rows[1]["peak_bytes"] <= rows[0]["peak_bytes"]


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


def test_peers_rows_time_the_decode_steps_apart_from_the_prefill():
    """The greedy rows also report the decode loop's own rate (a 1-token generation of each prompt
    timed as its prefill), and the table shows it against the roofline beside the whole rate."""
    import types

    from helpers import tiny_model

    from mtp.bench.peers_bench import _run_ours, format_table
    from mtp.decode.generate import DecodeConfig

    loaded = types.SimpleNamespace(model=tiny_model(seed=1))
    row, outs = _run_ours(loaded, [[5, 6, 7], [8, 9]], DecodeConfig("greedy", max_new_tokens=6), 1, decode_rate=True)
    assert [len(o) for o in outs] == [6, 6] and row["tokens_per_forward"] == 1.0
    assert row["decode_tokens_per_s"] > 0 and row["tokens_per_s"] > 0
    row.update(roofline_tokens_per_s=1e6, fraction_of_roofline=row["tokens_per_s"] / 1e6, step_bytes=1000,
               decode_fraction_of_roofline=row["decode_tokens_per_s"] / 1e6)
    text = format_table({"rows": {"mtp greedy": row}, "read_bandwidth_gb_s": 1.0})
    assert "decode steps alone" in text and "mtp greedy" in text
