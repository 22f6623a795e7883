"""Polynomial arithmetic in F7[X]/(X^5): train on 1-3 operations, validate on 4-5 (out of
distribution). Byte tokenizer; mtp/data/synthetic.py and docs/synthetic.md describe the task.

Run:     mtp train --config configs/polynomial.py
Expect:  a baseline, not a solved task. Measured: 400 steps took 20.8 min wall on a 2-core CPU
         that other jobs kept at load ~9. Held-out (4-5 ops) table: head 1 0.92 nats / 62.6% top-1,
         head 2 1.22 / 57.3%. Greedy head-1 answers, exact match: 3.0% on the first 200
         validation examples (4 ops 4.1%, 5 ops 2.0%) and 4.0% on 200 fresh in-distribution
         examples (1 op 6.9%, 2 ops 3.0%, 3 ops 1.6%): this size and budget barely learns the
         arithmetic; raise train.steps / model size for a real comparison.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "polynomial"
    c.data.source = "polynomial"
    c.data.tokenizer = "bytes"
    c.model.vocab_size = c.data.vocab_size = 260
    c.data.poly_train_ops = (1, 2, 3)
    c.data.poly_test_ops = (4, 5)
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 2
    c.model.max_seq_len = 256
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.eval_batches = 8
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 40
    c.loss.chunk_size = 64
    return c
