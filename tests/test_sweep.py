"""``mtp sweep``: grid parsing, resumption (finished points are skipped, unfinished ones rerun),
failures, results table, plots, tokens/forward, emitted jobs, and one real tiny training sweep.

Most tests replace ``mtp.train.loop.train`` with a fake that writes what ``train()`` writes
(config.json, metrics.jsonl, eval.json), so the sweep logic runs in milliseconds;
``test_real_sweep_trains_and_resumes`` trains for real (configs/tiny.py, 2 steps).
"""

import json
import types
from pathlib import Path

import pytest

import mtp.sweep.run
from mtp.sweep import SIZES, SweepError, make_grid, parse_spec
from mtp.sweep.cli import main as sweep_main
from mtp.sweep.grid import safe_name, split_values
from mtp.sweep.run import (
    InProcessRunner,
    PointFailed,
    SubprocessRunner,
    collect,
    run_points,
)

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.py")
FAST = ["--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_batches=1",
        "--config.train.tensorboard=False", "--config.perf.peak_flops_per_device=1e11"]


# --- grid -----------------------------------------------------------------------------------
def test_parse_spec_and_values():
    spec = parse_spec("model.n_future=1,2,4")
    assert (spec.key, spec.values) == ("model.n_future", ("1", "2", "4"))
    assert parse_spec("--config.optim.lr=1e-3,3e-3").key == "optim.lr"
    assert split_values("(1,0.5),(1, 1)") == ["(1,0.5)", "(1, 1)"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]


@pytest.mark.parametrize("specs, fragment", [
    (["model.n_future"], "no '='"),
    (["model.n_futur=1,2"], "unknown config key 'model.n_futur'"),
    (["model.n_futur=1,2"], "Did you mean model.n_future"),
    (["model.size=xs,huge"], "unknown model size 'huge'"),
    (["model.n_future=1,,2"], "empty value"),
    (["model.n_future=1,1"], "repeats a value"),
    (["model.n_future=1,2", "model.n_future=4"], "names 'model.n_future' twice"),
    (["=1,2"], "names no key"),
    ([], "at least one --sweep"),
])
def test_bad_specs_are_errors_that_name_the_problem(specs, fragment):
    with pytest.raises(SweepError) as e:
        make_grid(specs)
    assert fragment in str(e.value)


def test_bad_values_fail_when_the_grid_is_made_naming_the_point():
    with pytest.raises(SweepError) as e:
        make_grid(["model.n_future=2,abc"], config_path=TINY)
    assert "model.n_future=abc" in str(e.value) and "expected a int" in str(e.value)
    with pytest.raises(SweepError, match="conflict"):
        make_grid(["model.parameter_matched=True,False"], parameter_matched=True)


def test_grid_is_the_cartesian_product_with_safe_unique_names(tmp_path):
    points = make_grid(["model.n_future=1,2", "model.size=xs,s"], ["--config.train.steps=3"],
                       parameter_matched=True, config_path=TINY)
    assert [p.name for p in points] == ["n_future=1,size=xs", "n_future=1,size=s",
                                        "n_future=2,size=xs", "n_future=2,size=s"]
    p = points[3]
    assert p.overrides[:2] == ("train.steps=3", "model.parameter_matched=True")
    assert "model.n_future=2" in p.overrides
    assert {f"model.{k}={v}" for k, v in SIZES["s"].items()} <= set(p.overrides)
    assert p.workdir(tmp_path) == tmp_path / "n_future=2,size=s"
    from mtp.sweep.grid import point_config

    cfg = point_config(TINY, p, tmp_path)
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_future) == (128, 4, 2)
    assert cfg.model.parameter_matched is True and cfg.train.steps == 3
    assert cfg.workdir == str(tmp_path / "n_future=2,size=s")
    # values with path separators become safe directory names that stay distinct
    names = [q.name for q in make_grid(["data.source=/a/b,/a_b,a b"])]
    assert all("/" not in n and " " not in n for n in names) and len(set(names)) == 3
    assert safe_name("n_future=4") == "n_future=4"
    assert len(safe_name("x" * 500)) <= 96


# --- a fake trainer: writes what train() writes -----------------------------------------------
class FakeTrain:
    def __init__(self, fail_when=None):
        self.calls = []
        self.fail_when = fail_when or (lambda cfg: False)

    def __call__(self, cfg):
        d = Path(cfg.workdir)
        self.calls.append(d.name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg.to_dict(), default=str))
        n, steps = cfg.model.n_future, cfg.train.steps
        if self.fail_when(cfg):
            raise RuntimeError(f"fake failure for n_future={n}")
        with (d / "metrics.jsonl").open("a") as f:
            for s in range(1, steps + 1):
                rec = {"step": s, "split": "train", "time": 0.0, "perf/step_time_s": 0.01 * n,
                       "perf/tokens_per_s": 1000.0 / n}
                rec.update({f"loss/head_{i + 1}": 6.0 - 0.1 * s + 0.05 * i for i in range(n)})
                f.write(json.dumps(rec) + "\n")
            val = {"step": steps, "split": "validation", "time": 0.0}
            val.update({f"loss/head_{i + 1}": 5.0 + 0.1 * i for i in range(n)})
            val.update({f"acc/head_{i + 1}": 0.3 - 0.05 * i for i in range(n)})
            f.write(json.dumps(val) + "\n")
        (d / "eval.json").write_text(json.dumps({
            "loss": [5.0 + 0.1 * i for i in range(n)], "acc": [0.3 - 0.05 * i for i in range(n)],
            "tokens": [100] * n, "step": steps}))
        from mtp.train.loop import TrainResult

        return TrainResult(step=steps, preempted=False, workdir=d, evaluation=json.loads((d / "eval.json").read_text()))


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(mtp.sweep.run, "train", fake)
    return fake


def _grid(values="1,2,4", extra=()):
    return make_grid([f"model.n_future={values}"], ["--config.train.steps=3", *extra], config_path=TINY)


def test_resume_skips_finished_points_and_reruns_only_unfinished(tmp_path, fake_train):
    points = _grid()
    first = run_points(TINY, points, tmp_path, InProcessRunner())
    assert first.ran == ["n_future=1", "n_future=2", "n_future=4"] and not first.skipped
    assert fake_train.calls == first.ran
    evals = {p.name: tmp_path / p.name / "eval.json" for p in points}
    mtimes = {k: v.stat().st_mtime_ns for k, v in evals.items()}

    again = run_points(TINY, points, tmp_path, InProcessRunner())
    assert again.skipped == first.ran and not again.ran and not again.failed
    assert fake_train.calls == first.ran  # the trainer was not called again
    assert {k: v.stat().st_mtime_ns for k, v in evals.items()} == mtimes

    evals["n_future=2"].unlink()  # a point interrupted before its final evaluation
    partial = json.loads(evals["n_future=4"].read_text())
    evals["n_future=4"].write_text(json.dumps({**partial, "step": 1}))  # eval of a shorter run
    third = run_points(TINY, points, tmp_path, InProcessRunner())
    assert third.ran == ["n_future=2", "n_future=4"] and third.skipped == ["n_future=1"]
    assert fake_train.calls == first.ran + ["n_future=2", "n_future=4"]
    assert evals["n_future=1"].stat().st_mtime_ns == mtimes["n_future=1"]
    state = json.loads((tmp_path / "n_future=2" / "sweep_point.json").read_text())
    assert [a["status"] for a in state["attempts"]] == ["finished", "finished"]


def test_cli_failed_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    fake = FakeTrain(fail_when=lambda cfg: cfg.model.n_future == 2)
    monkeypatch.setattr(mtp.sweep.run, "train", fake)
    args = ["--config", TINY, "--sweep", "model.n_future=1,2,4", "--workdir", str(tmp_path),
            "--in-process", "--config.train.steps=3", "--no-tpf"]
    assert sweep_main(args) == 1  # one point failed -> nonzero
    assert fake.calls == ["n_future=1", "n_future=2", "n_future=4"]  # the sweep went on
    err = capsys.readouterr().err
    assert "[sweep 2/3] n_future=2: FAILED" in err and "[sweep 3/3] n_future=4: running" in err

    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["point"]: r for r in results["rows"]}
    assert list(rows) == ["n_future=1", "n_future=2", "n_future=4"]
    assert [rows[k]["status"] for k in rows] == ["finished", "failed", "finished"]
    assert "fake failure for n_future=2" in rows["n_future=2"]["error_tail"]
    assert rows["n_future=4"]["val_loss"] == pytest.approx([5.0, 5.1, 5.2, 5.3])
    assert rows["n_future=4"]["val_acc"] == pytest.approx([0.3, 0.25, 0.2, 0.15])
    assert rows["n_future=4"]["step_time_s"] == pytest.approx(0.04)
    assert rows["n_future=4"]["tokens_per_s"] == pytest.approx(250.0)
    assert rows["n_future=1"]["tokens_per_forward"] == 1.0
    # tiny: each extra head is one transformer layer, d 64, 4 query / 2 kv heads of 16, d_ff 192, two norms
    assert rows["n_future=4"]["params"] - rows["n_future=1"]["params"] == 3 * (64 * 16 * 12 + 3 * 64 * 192 + 2 * 64)
    assert 0 <= rows["n_future=4"]["wall_s"] < 60
    md = (tmp_path / "results.md").read_text()
    assert "## Failed points" in md and "fake failure for n_future=2" in md
    assert "| `n_future=4` | finished | 4 |" in md and "5.000 / 5.100 / 5.200 / 5.300" in md
    for name in ("val_loss", "train_loss", "acc_vs_n", "tokens_per_forward", "cost_vs_n", "mean_vs_n"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"(plots/{name}.png)" in md

    # Rerun with the stored grid: only the failed point trains again, and now it succeeds.
    fake.fail_when = lambda cfg: False
    assert sweep_main(["--workdir", str(tmp_path), "--in-process", "--no-tpf"]) == 0
    assert fake.calls[3:] == ["n_future=2"]
    assert "n_future=1: finished earlier" in capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["finished"] * 3


def test_tokens_per_forward_through_the_decode_api(tmp_path, fake_train, monkeypatch):
    calls = []

    def tokens_per_forward(loaded, prompts, heads, max_new_tokens=64):
        calls.append((loaded, list(prompts), heads, max_new_tokens))
        return 1.0 + 0.5 * (heads - 1)

    monkeypatch.setattr(mtp.sweep.run, "tokens_per_forward", tokens_per_forward)
    monkeypatch.setattr(mtp.sweep.run, "PAD_TO", 1)
    def load_model(d):  # a 16-token context and one token per character
        tokenizer = types.SimpleNamespace(encode=lambda text: [ord(c) for c in text])
        return types.SimpleNamespace(name=Path(d).name, spec=types.SimpleNamespace(max_seq_len=16),
                                     tokenizer=tokenizer)

    monkeypatch.setattr(mtp.sweep.run, "load_model", load_model)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "def f(x):"}\n{"prompt": "import os"}\n{"prompt": "x"}\n')
    args = ["--config", TINY, "--sweep", "model.n_future=1,3", "--workdir", str(tmp_path / "w"),
            "--in-process", "--config.train.steps=3", "--prompts", str(prompts),
            "--tpf-max-new-tokens", "12"]
    assert sweep_main(args) == 0
    # only for n_future >= 2; at most half the context is generated and prompts are cut to fit
    [(loaded, used, heads, max_new)] = calls
    assert (loaded.name, used, heads, max_new) == ("n_future=3", ["def f(x)", "import o", "x"], 3, 8)
    rows = json.loads((tmp_path / "w" / "results.json").read_text())["rows"]
    assert [r["tokens_per_forward"] for r in rows] == [1.0, 2.0]
    assert sweep_main(args) == 0 and len(calls) == 1  # cached per point: not measured again


def test_emit_jobs_prints_one_command_per_unfinished_point(tmp_path, fake_train, capsys):
    run_points(TINY, _grid("1"), tmp_path, InProcessRunner())  # n_future=1 is finished
    args = ["--config", TINY, "--sweep", "model.n_future=1,2,4", "--workdir", str(tmp_path),
            "--emit-jobs", "--launcher", "launch/local.sh 2", "--config.train.steps=3"]
    assert sweep_main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, n in zip(lines, (2, 4)):
        assert line.startswith(f"launch/local.sh 2 mtp train --config {TINY} --workdir ")
        assert f"n_future={n}" in line and "--config.train.steps=3" in line
        assert f"--config.model.n_future={n}" in line
    assert fake_train.calls == ["n_future=1"]


def test_subprocess_runner_records_a_failing_point(tmp_path):
    # 4 heads parameter-matched on tiny's 2 layers leaves no trunk: `mtp train` refuses it at once.
    points = make_grid(["model.n_future=4"], ["--config.train.steps=2"], parameter_matched=True)
    runner = SubprocessRunner(TINY)
    assert runner.command(points[0], tmp_path)[1:5] == ["-m", "mtp.cli", "train", "--config"]
    outcome = run_points(TINY, points, tmp_path, runner)
    assert list(outcome.failed) == ["n_future=4"] and not outcome.ran
    row = collect(TINY, points, tmp_path, outcome)[0]
    assert row["status"] == "failed" and "exited with status" in row["error"]
    assert "parameter_matched" in row["error_tail"]
    assert "parameter_matched" in (tmp_path / "n_future=4" / "train.log").read_text()
    with pytest.raises(PointFailed):
        SubprocessRunner(TINY, "false")(points[0], None, tmp_path / "x")


# --- real training ----------------------------------------------------------------------------
def test_real_sweep_trains_and_resumes(tmp_path, capsys):
    """The real train() (configs/tiny.py, 2 steps, in-process): the point's row comes from what
    train() wrote; with its eval.json gone the point resumes from its own checkpoint (no step is
    trained again); once finished, a rerun skips it. (The many-point skip logic is tested above
    with the fake trainer, which keeps this file fast.)"""
    w = tmp_path / "w"
    args = ["--config", TINY, "--sweep", "model.n_future=2", "--workdir", str(w), "--in-process",
            "--no-tpf", *FAST]
    assert sweep_main(args) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    d = w / "n_future=2"
    [row] = json.loads((w / "results.json").read_text())["rows"]
    assert row["status"] == "finished" and row["step"] == 2 and len(row["val_loss"]) == 2
    assert all(0 < x < 10 for x in row["val_loss"])
    perf = [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "perf/tokens_per_s" in r]
    assert perf and row["tokens_per_s"] == pytest.approx(sum(r["perf/tokens_per_s"] for r in perf) / len(perf))
    assert all(r["perf/tokens_per_s"] * r["perf/step_time_s"] == pytest.approx(8 * 64) for r in perf)  # tiny's batch
    assert row["val_loss"] == json.loads((d / "eval.json").read_text())["loss"]

    (d / "eval.json").unlink()  # as if the run was killed after its last checkpoint
    train_records = (d / "metrics.jsonl").read_text().count('"split": "train"')
    assert sweep_main(args) == 0
    err = capsys.readouterr().err
    assert "n_future=2: resuming" in err and "Resumed from" in err and "(step 2)" in err
    assert json.loads((d / "eval.json").read_text())["step"] == 2
    assert (d / "metrics.jsonl").read_text().count('"split": "train"') == train_records

    mtime = (d / "eval.json").stat().st_mtime_ns
    assert sweep_main(args) == 0
    assert "n_future=2: finished earlier" in capsys.readouterr().err
    assert (d / "eval.json").stat().st_mtime_ns == mtime


def test_seeds_are_aggregated_into_mean_and_standard_error():
    from mtp.sweep.report import aggregate, is_seed_key, mean_table

    assert is_seed_key("seed") and is_seed_key("data.synthetic_seed") and not is_seed_key("model.n_future")
    rows = []
    for seed, n, acc, score in [(0, 1, 0.5, 0.1), (1, 1, 0.7, 0.3), (2, 1, 0.6, 0.2), (0, 2, 0.4, 0.9)]:
        rows.append({"point": f"seed={seed},n_future={n}", "overrides": {"seed": str(seed), "model.n_future": str(n)},
                     "n_future": n, "params": 1000, "status": "finished", "val_loss": [2.0 + seed, 9.0],
                     "val_acc": [acc], "task": {"induction": score, "step": 3}, "wall_s": 10.0})
    rows.append({**rows[-1], "point": "seed=1,n_future=2", "overrides": {"seed": "1", "model.n_future": "2"},
                 "status": "pending"})
    groups = aggregate(rows, ["seed", "model.n_future"])
    assert [g["label"] for g in groups] == ["n_future=1", "n_future=2"]
    one, two = groups
    assert one["seeds"] == ["seed=0", "seed=1", "seed=2"] and len(two["points"]) == 2 and two["seeds"] == ["seed=0"]
    assert one["metrics"]["head-1 top-1"]["mean"] == pytest.approx(0.6)
    assert one["metrics"]["head-1 top-1"]["stderr"] == pytest.approx(0.1 / 3 ** 0.5)  # sd 0.1, k=3
    assert one["metrics"]["induction"]["mean"] == pytest.approx(0.2) and "step" not in one["metrics"]
    assert one["metrics"]["head-1 val loss"]["stderr"] == pytest.approx(1 / 3 ** 0.5)
    assert two["metrics"]["induction"] == {"mean": 0.9, "stderr": None, "values": [0.9]}
    table = "\n".join(mean_table(groups, ["seed"]))
    assert "| `n_future=1` | 1 | 1.0k | 3 |" in table and "0.600 ± 0.058" in table and "| 0.900 |" in table
