"""Never lose a run: each mistake a user can make against a workdir is replayed here, and the test
checks that nothing is renamed, deleted or restarted wrongly, and that the message names the cause
and the fix (no traceback for user errors)."""

import errno
import shutil

import orbax.checkpoint as ocp
import pytest
from helpers import tiny_config

from mtp.cli import main
from mtp.config import ConfigError
from mtp.train.checkpoint import CheckpointIncompatible, CheckpointUnreadable, NoUsableCheckpoint, classify
from mtp.train.loop import train
from mtp.workdir import WorkdirError, load_model

STEPS = 4


def _config(workdir, **train_overrides):
    cfg = tiny_config(vocab_size=512)
    cfg.workdir = str(workdir)
    cfg.train.update(dict(steps=STEPS, checkpoint_every=2, eval_batches=1, tensorboard=False, log_every=2))
    cfg.train.update(train_overrides)
    return cfg


def _listing(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


def _damage(step_dir):
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[:16])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("safety") / "run"
    result = train(_config(workdir))
    assert result.step == STEPS and not result.preempted
    assert _listing(workdir) == ["2", "4"]
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    return workdir


def test_another_train_setting_is_refused_and_nothing_is_touched(run):
    """Scenario 1: rerunning with a different `train` setting used to rename both intact checkpoints."""
    before = _listing(run)
    with pytest.raises(WorkdirError, match=r"train\.trainable \(saved 'all', now 'heads'\).*Nothing was changed"):
        train(_config(run, trainable="heads"))
    assert _listing(run) == before
    result = train(_config(run, steps=STEPS + 2))  # the original config resumes where it stopped
    assert result.step == STEPS + 2 and _listing(run) == ["2", "4", "6"]


def test_another_model_checkpoint_is_incompatible_not_damaged(run):
    """A checkpoint whose tree does not fit the config is refused untouched, even without config.json."""
    (run / "config.json").unlink()
    cfg = _config(run)
    cfg.model.d_model = 48
    with pytest.raises(CheckpointIncompatible, match="different model or optimizer config"):
        train(cfg)
    assert _listing(run) == ["2", "4"]


def test_all_damaged_never_restarts_silently(run, capsys):
    """Scenario 2: after 'no checkpoint could be read', the same command must not start from step 0."""
    for step in ("2", "4"):
        _damage(run / "checkpoints" / step)
    with pytest.raises(NoUsableCheckpoint, match="--restart"):
        train(_config(run, steps=STEPS + 2))
    err = capsys.readouterr().err
    assert err.count("is damaged") == 2 and "Traceback" not in err
    kept = _listing(run)
    assert len(kept) == 2 and all(".damaged-" in name for name in kept)  # moved aside, not deleted
    with pytest.raises(ConfigError, match="refusing to start over from step 0.*--restart"):
        train(_config(run, steps=STEPS + 2))
    assert _listing(run) == kept
    result = train(_config(run, steps=2), restart=True)  # the user said so
    assert result.step == 2 and set(kept) <= set(_listing(run))


def test_restart_with_a_readable_checkpoint_is_refused(run):
    with pytest.raises(ConfigError, match="--restart: .*/4 is a readable checkpoint"):
        train(_config(run, steps=STEPS + 2), restart=True)
    assert _listing(run) == ["2", "4"]


def test_permission_error_is_not_corruption(run, monkeypatch):
    """Scenario 3: an unreadable file (root cannot chmod itself out, so the read fails by patch)."""
    def denied(self, step, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", f"{self.directory}/{step}/state/manifest.ocdbt")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", denied)
    with pytest.raises(CheckpointUnreadable, match="Permission denied.*Nothing was changed"):
        train(_config(run, steps=STEPS + 2))
    assert _listing(run) == ["2", "4"]


@pytest.mark.parametrize("exc, kind", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission"),
    (ValueError('PERMISSION_DENIED: error opening "x/manifest.ocdbt"'), "permission"),
    (OSError(errno.EIO, "Input/output error"), "io"),
    (ValueError("OUT_OF_RANGE: Error reading ... Requested byte range"), "damaged"),
    (FileNotFoundError(errno.ENOENT, "No such file"), "damaged"),
])
def test_classify(exc, kind):
    assert classify(exc) == kind
    wrapped = RuntimeError("restore failed")
    wrapped.__cause__ = exc  # Orbax wraps the file system's error
    assert classify(wrapped) == kind


def test_generate_falls_back_from_a_damaged_newest_checkpoint(run, capsys):
    """Scenario 4: read-only commands share the reader: one warning line, the previous checkpoint,
    and the damaged one left where it is."""
    _damage(run / "checkpoints" / "4")
    loaded = load_model(run)
    assert loaded.step == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint" in err and "is damaged" in err
    assert _listing(run) == ["2", "4"]
    assert main(["generate", "--workdir", str(run), "--prompt", "x = ", "--max-new-tokens", "3"]) == 0


def test_a_failed_first_start_leaves_nothing_that_blocks(tmp_path):
    """Scenario 5: a config that fails after validation must not leave a config.json behind."""
    workdir = tmp_path / "w"
    cfg = _config(workdir)
    cfg.data.source = str(tmp_path / "no-such-dir")
    with pytest.raises(ValueError, match="matched no files"):
        train(cfg)
    assert not (workdir / "config.json").exists()
    assert train(_config(workdir, steps=2)).step == 2


def test_corpus_smaller_than_a_batch_is_refused(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"{i}.txt").write_text("tiny")
    cfg = _config(tmp_path / "w")
    cfg.data.update(dict(source=str(docs), glob="*.txt", tokenizer="bytes", vocab_size=260))
    cfg.model.vocab_size = 260
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(cfg)


def _user_error(capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert match in err, err


def test_user_errors_end_in_a_message_and_exit_code_2(tmp_path, capsys):
    """Scenario 6: data matching no files, binary files, a config with a syntax error, an unwritable
    workdir, a flag the decoding mode would ignore."""
    cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
    _user_error(capsys, ["train", "--config", "tiny", "--workdir", str(tmp_path / "a"), cache,
                         f"--config.data.source={tmp_path}/none/*.txt"], "matched no files")
    binary = tmp_path / "binary"
    binary.mkdir()
    for i in range(3):
        (binary / f"{i}.txt").write_bytes(bytes(range(256)) * 8)
    _user_error(capsys, ["train", "--config", "tiny", "--workdir", str(tmp_path / "b"), cache,
                         f"--config.data.source={binary}", "--config.data.glob=*.txt"], "readable (non-empty UTF-8)")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    _user_error(capsys, ["train", "--config", str(bad)], "syntax error at line 1")
    _user_error(capsys, ["train", "--config", "tiny", "--workdir", "/proc/mtp-not-writable", cache],
                "Cannot write to the workdir")
    _user_error(capsys, ["generate", "--workdir", str(tmp_path), "--prompt", "x", "--heads", "99"],
                "--heads do(es) not apply to --mode greedy")
