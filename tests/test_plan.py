"""``mtp plan``: exact parameter bytes per device on the 7B config, mesh errors, and AOT numbers
from compiling a tiny config on the session's 8 simulated devices."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_config

from mtp.cli import main
from mtp.config import load_config
from mtp.model.spec import ModelSpec
from mtp.plan import PlanError, parse_mesh, plan

LLAMA_7B = Path(__file__).resolve().parent.parent / "configs" / "llama_7b.py"


def test_7b_param_bytes_match_analytic_count():
    cfg = load_config(LLAMA_7B)
    spec = ModelSpec.from_config(cfg.model)
    fsdp, tensor = 8, 2
    r = plan(cfg, {"data": 1, "fsdp": fsdp, "tensor": tensor}, 16, hbm_gib=80, compile=False)
    assert r["param_count"] == spec.param_count() == r["param_count_eval_shape"]
    assert 6.5e9 < r["param_count"] < 7.5e9
    # Norm scales are replicated; every matrix dim of the 7B shape divides fsdp=8 and tensor=2.
    D, layers = spec.d_model, spec.trunk_layers + spec.n_future
    norm_params = 2 * D * layers + D
    expected = ((spec.param_count() - norm_params) // (fsdp * tensor) + norm_params) * 4
    assert r["bytes_per_device"]["params"] == expected
    assert r["bytes_per_device"]["grads"] == expected
    # AdamW mu + nu, plus a few scalar counters.
    assert 2 * expected <= r["bytes_per_device"]["opt_state"] < 2 * expected + 1024
    # remat 'full' keeps one bf16 residual per trunk layer; micro-batch 1024 / 16 / (data*fsdp = 8) = 8
    B, T, c = 8, cfg.train.seq_len, 2
    acts = r["activation_parts"]
    assert acts["saved"] == spec.trunk_layers * B * T * D * c and acts["io"] == 2 * B * T * D * c
    assert r["bytes_per_device"]["activations"] == acts["total"] == sum(v for k, v in acts.items() if k != "total")
    assert r["flops_per_token"] == spec.flops_per_token(cfg.train.seq_len)
    assert r["fits"] is True and r["aot"] is None
    assert r["total_bytes_per_device"] == sum(r["bytes_per_device"].values())


def test_tiny_param_bytes_equal_a_count_by_hand():
    """Every dim divides the mesh (vocab 96): each matrix is split over fsdp x tensor = 4 devices, the
    norm scales are replicated. Counted from the shapes, not from ModelSpec."""
    cfg = tiny_config(vocab_size=96, tie_embeddings=False)  # D 32, 4 query / 2 kv heads of 8, 2 layers
    V, D, F = 96, 32, 128  # d_ff: 8/3 * 32 rounded up to a multiple of 64
    layer_matrices = D * 8 * (4 + 2 + 2 + 4) + 3 * D * F  # wq, wk, wv, wo; gate, up, down
    layers = 2 + 3  # trunk + n_future transformer heads
    matrices = 2 * V * D + layers * layer_matrices  # untied embedding and unembedding
    norms = layers * 2 * D + D  # two per layer + the final norm
    assert matrices + norms == 83_296
    r = plan(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, 8, compile=False)
    assert r["param_count"] == r["param_count_eval_shape"] == matrices + norms
    per_device = (matrices // 4 + norms) * 4  # float32
    assert r["bytes_per_device"]["params"] == r["bytes_per_device"]["grads"] == per_device
    assert 2 * per_device <= r["bytes_per_device"]["opt_state"] < 2 * per_device + 64  # AdamW mu, nu


def test_fits_is_false_when_hbm_too_small_and_null_without_hbm():
    cfg = load_config(LLAMA_7B)
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan(cfg, mesh, 8, hbm_gib=1.0, compile=False)["fits"] is False
    assert plan(cfg, mesh, 8, hbm_gib=None, compile=False)["fits"] is None


@pytest.mark.parametrize("text, fragment", [
    ("data=1,fsdp", "has no '='"),
    ("data=1,pipe=2", "unknown axis 'pipe'"),
    ("data=two", "not an integer"),
    ("data=0", "must be positive"),
    ("data=1,data=2", "given twice"),
])
def test_bad_mesh_string_names_the_part_and_expected_form(text, fragment):
    with pytest.raises(PlanError, match="data=1,fsdp=8,tensor=1|must be positive") as e:
        parse_mesh(text)
    assert fragment in str(e.value)


def test_mesh_product_must_equal_devices():
    assert parse_mesh("fsdp=4,tensor=2") == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(PlanError, match="= 8 but 16 devices"):
        plan(load_config(LLAMA_7B), parse_mesh("fsdp=4,tensor=2"), 16, compile=False)


def test_cli_reports_bad_mesh(capsys):
    with pytest.raises(SystemExit, match="mtp plan: --mesh part 'fsdp:8'"):
        main(["plan", "--config", str(LLAMA_7B), "--mesh", "fsdp:8"])


def test_tiny_config_aot_compile_on_8_devices():
    cfg = tiny_config()
    cfg.train.batch_size, cfg.train.seq_len = 8, 16
    r = plan(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, 8, hbm_gib=1.0, compile=True)
    aot = r["aot"]
    assert aot is not None, r["notes"]
    assert aot["temp"] > 0, aot
    # The compiled step's arguments hold the sharded params + optimizer state (+ the batch); the
    # state is donated, so the updated state (+ scalar metrics) is written over it in place.
    state = r["bytes_per_device"]["params"] + r["bytes_per_device"]["opt_state"]
    assert state <= aot["argument"] < state + 4096
    assert state <= aot["output"] < state + 4096
    assert state <= aot["alias"] <= min(aot["argument"], aot["output"])
    assert aot["total"] == aot["argument"] + aot["output"] - aot["alias"] + aot["temp"]
    # fits compares the larger of the analytic and compiled totals with the HBM given
    assert r["fits_bytes"] == max(r["total_bytes_per_device"], aot["total"]) and r["fits"] is True


def test_aot_in_a_subprocess_when_this_process_has_too_few_devices():
    cfg = tiny_config()
    cfg.train.batch_size, cfg.train.seq_len = 8, 16
    r = plan(cfg, {"data": 2, "fsdp": 4, "tensor": 2}, 16, compile=True, timeout_s=300)
    state = r["bytes_per_device"]["params"] + r["bytes_per_device"]["opt_state"]
    assert r["aot"]["temp"] > 0 and state <= r["aot"]["argument"] < state + 4096, r
    assert r["fits"] is None


def test_bfloat16_first_moment_halves_its_bytes():
    """optim.mu_dtype='bfloat16': AdamW's mu takes 2 bytes a parameter, nu stays float32."""
    cfg = tiny_config(vocab_size=96, tie_embeddings=False)
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    full = plan(cfg, mesh, 8, compile=False)["bytes_per_device"]
    cfg.optim.mu_dtype = "bfloat16"
    half = plan(cfg, mesh, 8, compile=False)["bytes_per_device"]
    assert half["params"] == full["params"]
    assert full["opt_state"] - half["opt_state"] == full["params"] // 2  # mu: 4 -> 2 bytes a parameter


def test_platform_resolves_auto_attention_for_the_estimate():
    """--platform: 'auto' resolves as for lowering (tpu -> splash, cuda -> pallas_gpu here, cpu -> xla) and
    the activation estimate drops its T x T terms with a kernel; params are unchanged."""
    cfg = load_config(LLAMA_7B)
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    runs = {p: plan(cfg, mesh, 8, hbm_gib=80, compile=False, platform=p) for p in ("cpu", "tpu", "cuda")}
    assert {p: r["attention"] for p, r in runs.items()} == {"cpu": "xla", "tpu": "splash", "cuda": "pallas_gpu"}
    assert runs["tpu"]["platform"] == "tpu" and runs["tpu"]["bytes_per_device"]["params"] == \
        runs["cpu"]["bytes_per_device"]["params"]
    # micro-batch 1024 / 16 / 8 = 8 sequences: xla's layer holds f32 scores + bf16 probabilities + a bool mask
    B, T, N = 8, cfg.train.seq_len, 32
    xla, kernel = runs["cpu"]["activation_parts"], runs["tpu"]["activation_parts"]
    assert xla["layer"] - kernel["layer"] == B * N * T * T * 6 + B * T * T - B * N * T * 4 - B * T * 4
    assert runs["cuda"]["activation_parts"] == kernel
    assert plan(cfg, mesh, 8, compile=False, lower_for=(), platform=None)["platform"] == "cpu"
    with pytest.raises(PlanError, match="--platform 'gpu'"):
        plan(cfg, mesh, 8, compile=False, platform="gpu")
