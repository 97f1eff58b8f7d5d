"""The paper's protocol on a 2-core CPU: `medium.py` (about 2.5 hours).

Walker2d, 1000-step episodes (the paper's), a 40x40 grid grown in 300
iterations to over a thousand elites (1,103 with seed 0), 50 evaluation
episodes per policy (the paper's). About 2.5 hours on 2 cores by the
stage times measured so far (README), most of it the evaluation's 400M env
steps; what keeps it there: the uniform sweep asks 256 descriptors instead
of one per elite, the text metric generates 16 policies per prompt, and the
codec's own reconstruction report (the evaluation repeats it under the full
protocol) uses 8 episodes.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(__file__))
import default  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.archive.update(episode_length=1000, grid_shape=(40, 40), num_iterations=300)
    config.codec.update(eval_episodes=8, eval_batch_size=128)
    config.diffusion.update(sweep_batch_size=128)
    config.text.update(label_batch_size=128)
    config.evaluate.update(episodes=50, uniform_conditions=256, text_samples=16)
    return config
