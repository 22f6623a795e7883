"""Induction on story-like text (Gloeckle et al. 2024, section 4.1): names that occur at least twice
and are two tokens long; the score is head 1's accuracy on the second token of a name's later
occurrences (mtp/data/synthetic.py "induction in stories", docs/synthetic.md).

Byte tokenizer, so a two-token name is two characters (an initial no other word starts with, then a
uniformly drawn letter): without copying the earlier occurrence the second token is right 1 time in
26. 2 trunk layers, width swept; n_future swept (heads are one transformer layer each, not parameter
matched).

Run:     mtp sweep --config paper_induction --sweep seed=0,1,2 --sweep model.d_model=32,64,128 \
             --sweep model.n_future=1,2 --workdir /work/runs/paper_induction --no-tpf --in-process \
             --config.train.calibrate=False
         (18 points, resumable; docs/experiments.md has the table)
Expect:  measured (2-4 min a point on a 2-core CPU at load 4-7, all 18 points): induction score
         (chance 1/26 = 0.038) d=32: 0.040 (n=1) / 0.035 (n=2); d=64: 0.047 / 0.043; d=128:
         0.059 +- 0.005 / 0.042 +- 0.003, controls 0.033-0.046. At 250 steps copying has only
         begun, and only with n=1; the head-1 loss is equal for n=1 and 2 (0.44 nats/byte at d=128).
         With --config.train.steps=750 (d=128, seed 0) both copy: 0.514 (n=1) / 0.506 (n=2) at
         step 750, 0.491 / 0.507 at step 500 (docs/experiments.md, "Steps probe"). That ~0.5 is a
         plateau: the models copy SOME name's letter (induction_any_name ~1.0, `mtp eval --workdir
         W --task-scores`), not the right one. With --config.train.steps=3000 (d=128, seed 0) n=2
         binds names (0.99 at step 2500) while n=1 reaches 0.59 at step 3000 ("Steps probe 2").
"""

from mtp.config import base_config


def get_config():
    c = base_config()
    c.name = "paper_induction"
    c.data.source = "induction"
    c.data.induction_format = "stories"
    c.data.induction_name_len = 2
    c.data.tokenizer = "bytes"
    c.model.vocab_size = c.data.vocab_size = 260
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 2
    c.model.n_future = 1
    c.model.max_seq_len = 384
    c.train.steps = 250
    c.train.batch_size = 12
    c.train.seq_len = 384
    c.train.log_every = 10
    c.train.checkpoint_every = 125
    c.train.eval_batches = 4
    c.train.calibrate = False  # no decode-tree calibration at the end (not part of the experiment)
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    c.loss.chunk_size = 64
    return c
