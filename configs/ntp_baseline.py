"""NTP baseline: configs/default.py with one head, i.e. plain next-token prediction.

Run:     mtp train --config configs/ntp_baseline.py
Expect:  a little faster than the default (3 fewer head layers and unembeddings); a head-1
         held-out loss close to the default's head 1 (Gloeckle et al. find that MTP does not help
         models this small). Compare with: mtp train --config configs/ntp_baseline.py
         --config.model.n_layers=7 for a depth-matched baseline.
"""

from mtp.config import load_config_file


def get_config():
    c = load_config_file(__file__.replace("ntp_baseline.py", "default.py"))
    c.name = "ntp_baseline"
    c.model.n_future = 1
    return c
