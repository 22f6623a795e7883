"""Induction: copy a random 16-character pattern after a '|' (mtp/data/synthetic.py, docs/synthetic.md).

Byte tokenizer (one token per character); 20,000 train and 1,000 validation examples generated
from data.synthetic_seed. Every token of the second occurrence is predictable only by copying.

Run:     mtp train --config configs/induction.py
Expect:  300 steps; measured 8.4 min wall on a 2-core CPU that other jobs kept at load ~8 (it ran
         at 3-4 steps/s while the machine was quiet). The loss plateaus by step ~100 at what copying
         leaves: the first occurrence is random (ln 26 = 3.26 nats a token). Held-out table
         (measured): head 1 1.72 nats / 49.7% top-1, head 2 1.66 / 51.6% (top-1 cannot pass ~55%:
         half the tokens are random). Greedy decoding with head 1 copies the pattern perfectly:
         evaluate_task('induction', ...) = 1.0 on the first 200 validation examples.
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "induction"
    c.data.source = "induction"
    c.data.tokenizer = "bytes"
    c.model.vocab_size = c.data.vocab_size = 260
    c.data.induction_pattern_len = 16
    c.data.induction_vocab = 26
    c.model.d_model = 128
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 2
    c.model.max_seq_len = 256
    c.train.steps = 300
    c.train.batch_size = 32
    c.train.seq_len = 128
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.eval_batches = 8
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.loss.chunk_size = 64
    return c
