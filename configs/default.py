"""Default: a small 4-head MTP model (Gloeckle transformer-layer heads) trained on the running
interpreter's standard-library Python source.

Run:     mtp train                       (same as: mtp train --config configs/default.py)
Expect:  ~9 minutes on a 2-core CPU (the first run adds ~20 s to build the corpus and tokenizer),
         ending with a held-out table whose loss grows and accuracy falls with the distance a head
         looks ahead. Measured (docs/benchmarks.md): head 1 (t+1) 4.01 nats / 25.1% top-1,
         head 2 4.70 / 18.4%, head 3 5.04 / 13.8%, head 4 5.25 / 11.2%. The model (1.8M
         parameters) is sized for a CPU: 400 steps see ~1.6M tokens.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "default"
    c.model.vocab_size = c.data.vocab_size = 2048
    c.model.d_model = 128
    c.model.n_layers = 4
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 4
    c.model.head_type = "transformer"
    c.model.max_seq_len = 1024
    c.loss.impl = "scan"
    c.train.steps = 400
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.eval_batches = 16
    c.optim.lr = 5e-3
    c.optim.warmup_steps = 40
    return c
