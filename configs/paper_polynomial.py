"""Polynomial arithmetic in F7[X]/(X^5) as in Gloeckle et al. (2024), section 4.2: the head-count
grid (n = 1, 2, 4) with seeds. Byte tokenizer; train on 1-3 operations, validate on 4-5 (out of
distribution). configs/polynomial.py is the single-run baseline this extends: 3000 steps on 200,000
expressions (the earlier 500 steps on 20,000 never left the answer-format floor of ~3% exact match).

Run:     mtp sweep --config paper_polynomial --sweep seed=0,1,2 --sweep model.size=xs \
             --sweep model.n_future=1,2,4 --workdir /work/runs/paper_polynomial_3k --no-tpf --in-process
         (9 points; resumable: rerun the same command; docs/experiments.md has the tables)
Expect:  measured for all 9 points on a shared 2-core CPU (10-28 min a point): exact match (teacher
         forced = greedy) in distribution n=1 0.199 +- 0.025, n=2 0.215 +- 0.010, n=4 0.161 +-
         0.024; out of distribution 0.017 / 0.024 / 0.015. The second size, d=32 (add
         --config.model.d_model=32, own --workdir): 0.060 / 0.042 / 0.039, n=1 ahead in every
         seed; the size step gains ~9x any head effect (docs/experiments.md). `--sweep
         model.size=xs,s` adds the larger size (~4x a step, a GPU job).
"""

from mtp.config import load_config_file


def get_config():
    c = load_config_file(__file__.replace("paper_polynomial.py", "polynomial.py"))
    c.name = "paper_polynomial"
    c.model.n_future = 1
    c.train.steps = 3000  # 500 steps (2M tokens) left every point on the answer-format floor (~3% exact)
    c.train.checkpoint_every = 500
    c.optim.warmup_steps = 100
    c.data.synthetic_examples = 200_000  # 8.3M tokens of examples, 12.3M trained: ~1.5 passes
    c.train.eval_batches = 8
    c.train.calibrate = False  # no decode-tree calibration at the end (not part of the experiment)
    return c
