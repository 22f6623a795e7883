"""Tiny: the test config. Seconds on a CPU; exercises every code path of `mtp train`.

Run:     mtp train --config configs/tiny.py --workdir /tmp/mtp-tiny
Expect:  ~30 s; every head's loss falls from ~ln(512)=6.2 to below ~5 within 40 steps.
         No decode artifacts at the end (train.calibrate=False: the tests train it dozens of times;
         `mtp calibrate --workdir /tmp/mtp-tiny` makes them, or pass --config.train.calibrate=True).
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.model.vocab_size = c.data.vocab_size = 512
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 3
    c.model.max_seq_len = 128
    c.data.max_files = 40
    c.data.tokenizer_max_chars = 400_000
    c.data.val_fraction = 0.1
    c.train.steps = 40
    c.train.batch_size = 8
    c.train.seq_len = 64
    c.train.log_every = 5
    c.train.checkpoint_every = 20
    c.train.eval_batches = 4
    c.train.tensorboard = True
    c.train.calibrate = False
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 5
    c.loss.chunk_size = 16
    return c
