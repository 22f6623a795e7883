"""`mtp generate` and `mtp bench decode` on a small workdir (byte tokenizer, heads copied from
head 1 so speculation accepts drafts)."""

import json

import pytest
from flax import nnx
from helpers import heads_like_head1, tiny_config, tiny_model

from mtp.cli import main
from mtp.decode.api import decode_config, encode_prompt, generate_ids
from mtp.workdir import load_model, save_params


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode_cli") / "w"
    d.mkdir()
    cfg = tiny_config(vocab_size=260, n_future=3, max_seq_len=128)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "tokenizer.bytes").touch()
    model = heads_like_head1(tiny_model(seed=4, vocab_size=260, n_future=3, max_seq_len=128), noise=0.3)
    save_params(d, nnx.state(model, nnx.Param))
    return d


def test_bench_decode_json(workdir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "import os\n", "a = [1,"]))
    outputs = tmp_path / "outputs.jsonl"
    rc = main(["bench", "decode", "--workdir", str(workdir), "--prompts", str(prompts), "--heads", "3",
               "--max-new-tokens", "24", "--repeats", "1", "--json", "--outputs", str(outputs),
               "--kernel-min-bytes", "0"])  # every product through the CPU kernels: still exact
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["def f(x):", "import os\n", "a = [1,"]
    loaded = load_model(workdir)
    dc = decode_config(loaded, mode="greedy", max_new_tokens=24, stop_at_eos=False)
    for r in rows:  # the text of plain greedy decoding, and speculative's is the same
        ids = generate_ids(loaded, [encode_prompt(loaded, r["prompt"])], dc)[0].tokens[0]
        assert r["greedy"] == loaded.tokenizer.decode(list(ids)) == r["speculative"] and r["identical"]
    for key in ("tokens_per_forward", "accept_rate_per_head", "tokens_per_s_greedy", "tokens_per_s_speculative",
                "speedup", "exact_match", "roofline_tokens_per_s"):
        assert key in out
    assert out["exact_match"] is True
    assert out["tokens_per_forward"] > 1.0 and len(out["accept_rate_per_head"]) == 2
    assert out["new_tokens"] == 3 * 24
    assert out["decode_weights"]["exact"] == 0 and out["draft_vocab"] == 260  # float weights, all tokens
    assert out["decode_settings"]["kernel_min_bytes"] == 0 and out["decode_settings"]["backend"] == "auto"


def test_a_draft_vocabulary_from_the_workdir_keeps_the_text(workdir, capsys):
    import numpy as np

    np.save(workdir / "draft_vocab.npy", np.argsort(np.arange(260) % 7, kind="stable").astype(np.int32))
    texts = []
    for mode, extra in (("greedy", []), ("speculative", ["--draft-vocab", "64"])):
        assert main(["generate", "--workdir", str(workdir), "--prompt", "y = ", "--mode", mode,
                     "--max-new-tokens", "12", "--ignore-eos", *extra]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    with pytest.raises(SystemExit, match="draft_vocab=-2"):
        main(["generate", "--workdir", str(workdir), "--prompt", "y", "--mode", "speculative", "--draft-vocab", "-2"])


def test_generate_streams_the_same_text_in_every_greedy_mode(workdir, capsys):
    """... with any decode settings (speculative here runs on XLA's operations, [out, in] matrices),
    and on a device mesh (the model's layers, sharded over 2 devices)."""
    texts = []
    for mode, settings in (("greedy", []), ("speculative", ["--decode-backend", "xla", "--decode-layout", "out_in",
                                                            "--no-fused-layers", "--kernel-threads", "1"]),
                           ("speculative", ["--mesh", "data=1,tensor=2"])):
        assert main(["generate", "--workdir", str(workdir), "--prompt", "x = ", "--mode", mode,
                     "--max-new-tokens", "12", "--ignore-eos", *settings]) == 0
        captured = capsys.readouterr()
        texts.append(captured.out)
        assert "12 tokens" in captured.err
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("x = ")
    with pytest.raises(SystemExit, match="tensor=16 needs 16 devices; this process has 8"):
        main(["generate", "--workdir", str(workdir), "--prompt", "x", "--mesh", "tensor=16"])
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        main(["generate", "--workdir", str(workdir), "--prompt", "x", "--packed-activations", "int4"])
    assert "--packed-activations: invalid choice: 'int4'" in capsys.readouterr().err


def test_bad_prompt_file_is_named(workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2"):
        main(["bench", "decode", "--workdir", str(workdir), "--prompts", str(bad)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["bench", "decode", "--workdir", str(workdir), "--prompts", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="not an mtp workdir"):
        main(["generate", "--workdir", str(tmp_path), "--prompt", "x"])


def test_bench_decode_with_a_calibrated_tree(workdir, tmp_path, capsys):
    """``--tree auto:N`` reads the N-node sparse tree ``mtp calibrate`` made on training-split prompts
    (never calibrating on its own: without it, an error names the command) and decodes exactly with it."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def f(x):", "import os\n"]))
    args = ["bench", "decode", "--workdir", str(workdir), "--prompts", str(prompts), "--heads", "3",
            "--tree", "auto:6", "--max-new-tokens", "16", "--repeats", "1", "--json"]
    with pytest.raises(SystemExit, match=f"Run `mtp calibrate --workdir {workdir} --heads 3 --tree-nodes 6`"):
        main(args)
    assert not (workdir / "draft_trees.json").exists()
    assert main(["calibrate", "--workdir", str(workdir), "--heads", "3", "--tree-nodes", "6,4",
                 "--no-draft-vocab"]) == 0
    assert "calibrated" in capsys.readouterr().err
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    saved = json.loads((workdir / "draft_trees.json").read_text())
    entry = saved["step=0,heads=3,nodes=6"]
    assert len(saved["step=0,heads=3,nodes=4"]["nodes"]) == 3
    assert out["tree"] == entry["tree"] and len(entry["nodes"]) == 5
    assert out["exact_match"] is True and entry["expected_tokens_per_forward"] >= entry["expected_chain"]
    with pytest.raises(SystemExit, match="--heads 4: this model has 3 heads"):
        main(["calibrate", "--workdir", str(workdir), "--heads", "4"])
