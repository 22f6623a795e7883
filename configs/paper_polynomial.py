"""Polynomial arithmetic in F7[X]/(X^5) as in Gloeckle et al. (2024), section 4.2: the head-count
grid (n = 1, 2, 4) at two model sizes and three seeds. Byte tokenizer; train on 1-3 operations,
validate on 4-5 (out of distribution). configs/polynomial.py is the single-run baseline this
extends (500 steps instead of 400, n_future swept).

Run:     mtp sweep --config paper_polynomial --sweep seed=0,1,2 --sweep model.size=xs,s \
             --sweep model.n_future=1,2,4 --workdir /work/runs/paper_polynomial --no-tpf \
             --config.train.calibrate=False
         (18 points; resumable: rerun the same command; docs/experiments.md has the tables)
Expect:  measured for seeds 0 and 1 (3-8 min a point on a loaded 2-core CPU): every point at the
         same floor, exact match 2.8-3.3% in distribution (fresh 1-3 op examples) and 0.9-1.1% out
         of distribution (4-5 ops), teacher forced (= greedy exact match), differences between n
         and between sizes <= 0.005; the correct answers are almost only the ones equal to 0. At
         500 steps no size learns the arithmetic: an undertrained baseline for the comparison,
         not the paper's regime.
"""

from mtp.config import load_config_file


def get_config():
    c = load_config_file(__file__.replace("paper_polynomial.py", "polynomial.py"))
    c.name = "paper_polynomial"
    c.model.n_future = 1
    c.train.steps = 500
    c.train.checkpoint_every = 250
    c.train.eval_batches = 8
    c.train.calibrate = False  # no decode-tree calibration at the end (not part of the experiment)
    return c
