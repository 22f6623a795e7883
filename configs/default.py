"""Default: a small 4-head MTP model (Gloeckle transformer-layer heads) on the interpreter's
standard-library Python source.

Run:     mtp train                       (same as: mtp train --config configs/default.py)
Expect:  about 12 minutes on a 2-core CPU including data preparation; a per-head table on the
         held-out files where loss rises with the head's distance (t+1 < t+2 < t+3 < t+4), e.g.
         head 1 ~2.0 nats / ~58% top-1 and head 4 ~3.6 nats after 600 steps (see
         docs/benchmarks.md for the measured run).
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "default"
    c.model.vocab_size = c.data.vocab_size = 4096
    c.model.d_model = 256
    c.model.n_layers = 4
    c.model.n_heads = 8
    c.model.n_kv_heads = 4
    c.model.n_future = 4
    c.model.head_type = "transformer"
    c.train.steps = 400
    c.train.batch_size = 8
    c.train.seq_len = 256
    c.train.log_every = 10
    c.train.checkpoint_every = 200
    c.train.eval_batches = 16
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 40
    return c
