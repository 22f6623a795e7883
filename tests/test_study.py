"""`mtp study` on a tiny NTP model produces every row of the retrofitting comparison."""

import json
import shutil

import pytest
from flax import nnx
from helpers import tiny_config

from mtp.data.prepare import prepare_data
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec
from mtp.study import run_study
from mtp.workdir import save_params


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    cfg = tiny_config(n_future=1, vocab_size=512)
    src = root / "ntp"  # a random NTP "pretrained" model with the tiny config's tokenizer
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg.to_dict()))
    shutil.copy(prepare_data(cfg.data).tokenizer.path, src / "tokenizer.model")
    save_params(src, nnx.state(MTPLM(ModelSpec.from_config(cfg.model), rngs=nnx.Rngs(3)), nnx.Param))
    result = run_study(root / "ntp", "code", steps=2, out=root / "out", layers=[1], ms=(1, 8), positions=4,
                       batch_size=8, seq_len=16, eval_batches=1, lora_rank=2)
    return root / "out", result


def test_every_row_is_there(study):
    out, result = study
    methods = {r["method"] for r in result["rows"]}
    assert methods == {"marginal_m1", "marginal_m8", "frozen_L1", "frozen_weighted", "joint_full", "joint_lora"}
    for m in methods:
        ks = sorted(r["k"] for r in result["rows"] if r["method"] == m)
        assert ks == [2, 3, 4], (m, ks)
    for r in result["rows"]:
        assert 0.0 <= r["top1"] <= r["top5"] <= 1.0, r
    saved = json.loads((out / "study.json").read_text())
    assert len(saved["rows"]) == len(result["rows"])
    assert (out / "study.png").stat().st_size > 0 and "joint_lora" in (out / "study.md").read_text()


def test_joint_rows_report_the_ntp_loss_move(study):
    out, result = study
    joint = [r for r in result["rows"] if r["method"].startswith("joint")]
    assert all("ntp_loss_before" in r and "ntp_loss_after" in r for r in joint)
    assert all(r["ntp_loss_before"] == result["ntp"]["loss"] for r in joint)
    assert "Head 1 (the source's own next-token prediction" in (out / "study.md").read_text()
    # the backbone of joint_full learns at lr * joint_lr_scale; LoRA rows keep one rate
    scale = lambda name: json.loads((out / "runs" / name / "config.json").read_text())["optim"]["backbone_lr_scale"]
    assert scale("joint_full") == 0.05 and scale("joint_lora") == 1.0


def test_rerunning_resumes_from_study_json(study, monkeypatch):
    out, result = study
    import mtp.study as study_mod

    def boom(*a, **k):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(study_mod, "_train_row", boom)
    monkeypatch.setattr(study_mod, "marginal_eval", boom)
    again = run_study(result["workdir"], "code", steps=2, out=out, layers=[1], ms=(1, 8), positions=4,
                      batch_size=8, seq_len=16, eval_batches=1, lora_rank=2)
    assert again["rows"] == result["rows"] and again["complete"]


def test_other_settings_keep_the_old_study_json(study, tmp_path):
    out, result = study
    shutil.copy(out / "study.json", tmp_path / "study.json")
    new = run_study(result["workdir"], "code", steps=2, out=tmp_path, ms=(1,), positions=2, seq_len=16,
                    methods=["marginal"])
    assert {r["method"] for r in new["rows"]} == {"marginal_m1"}
    kept = list(tmp_path.glob("study.*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["rows"] == result["rows"]


def test_another_length_in_the_same_out_is_refused_before_any_work(study):
    out, result = study
    before = (out / "study.json").read_text()
    with pytest.raises(ValueError, match="trained for 2 steps, not --steps 5: use a new --out"):
        run_study(result["workdir"], "code", steps=5, out=out, layers=[1], ms=(1, 8), positions=4,
                  batch_size=8, seq_len=16, eval_batches=1, lora_rank=2)
    assert (out / "study.json").read_text() == before and not list(out.glob("study.*.json"))


def test_bad_layers_are_rejected(study, tmp_path):
    out, result = study
    with pytest.raises(ValueError, match="trunk layers run 1..2"):
        run_study(result["workdir"], "code", steps=1, out=tmp_path, layers=[5], methods=["frozen"])
    with pytest.raises(ValueError, match="--data"):
        run_study(result["workdir"], "no-such-data", steps=1, out=tmp_path)
