"""lpd beside DCRL-MAP-Elites' descriptor-conditioned actor (about 40 min).

The default run with QDax's DCRL-ME emitter (``archive.dcrl.*``: 64
policy-gradient and 64 actor-injected offspring of each iteration's 256):
one archive, on which lpd's codec and denoiser are trained as on any other,
and the actor DCRL-ME trained during the search. ``lpd evaluate`` scores
the actor beside the generator, the codec and the baselines under one
protocol. The same iterations and batch as ``default.py``, so the archive
stage's extra wall time over the default's is what the actor costs.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.archive.emitter = "dcrl_me"
    return config
