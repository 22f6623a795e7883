"""Polynomial arithmetic in F7[X]/(X^5) as in Gloeckle et al. (2024), section 4.2: the head-count
grid (n = 1, 2, 4) at two model sizes and three seeds. Byte tokenizer; train on 1-3 operations,
validate on 4-5 (out of distribution). configs/polynomial.py is the single-run baseline this
extends (500 steps instead of 400, n_future swept).

Run:     mtp sweep --config paper_polynomial --sweep seed=0,1,2 --sweep model.size=xs,s \
             --sweep model.n_future=1,2,4 --workdir /work/runs/paper_polynomial --no-tpf
         (18 points; resumable: rerun the same command; docs/experiments.md has the tables)
Expect:  see docs/experiments.md section 1 ("Polynomial arithmetic"): per point exact match in
         distribution (fresh 1-3 op examples) and out of distribution (4-5 ops), teacher forced
         (= greedy exact match), mean +- standard error over the three seeds.
"""

from mtp.config import load_config_file


def get_config():
    c = load_config_file(__file__.replace("paper_polynomial.py", "polynomial.py"))
    c.name = "paper_polynomial"
    c.model.n_future = 1
    c.train.steps = 500
    c.train.checkpoint_every = 250
    c.train.eval_batches = 8
    return c
