"""Byte-level model with 8 heads (the paper's byte-level n=8 setting, CPU-sized) on the running
interpreter's standard-library Python source.

Byte tokenizer: 260 ids (256 bytes + pad/bos/eos/unk), nothing to train; head i predicts byte t+i.

Run:     mtp train --config configs/bytes_n8.py
Expect:  not yet measured to the end. Checked: a 10-step run works end to end (2.40M parameters,
         8 heads, workdir gets tokenizer.bytes; the stdlib becomes 30.5M byte tokens); on a 2-core
         CPU that other jobs kept at load ~9 a step took ~11 s, so time a run on a quiet machine
         before relying on it.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "bytes_n8"
    c.data.tokenizer = "bytes"
    c.model.vocab_size = c.data.vocab_size = 260
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 8
    c.model.head_type = "transformer"
    c.model.max_seq_len = 1024
    c.loss.impl = "scan"
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.eval_batches = 16
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 30
    return c
