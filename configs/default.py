"""Default: a small 4-head MTP model (Gloeckle transformer-layer heads) trained on the running
interpreter's standard-library Python source.

Run:     mtp train                       (same as: mtp train --config configs/default.py)
Expect:  ~11 minutes on a 2-core CPU (first run: +~20 s to build the corpus and tokenizer), then a
         per-head table on the held-out files in which loss grows and accuracy falls with the
         distance a head looks ahead (t+1 best, t+4 worst). The measured run is in
         docs/benchmarks.md. The model is sized for a CPU: ~1.5M tokens in 400 steps.
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
