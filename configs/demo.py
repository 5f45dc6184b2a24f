"""The README's demo job: a small CNN trained on the built-in `panns_demo` data.

Minutes on a laptop CPU, no download: 10 synthetic sound classes, multi-label 2 s clips.

    python -m panns_jax.main --config=configs/demo.py --workdir=workdir/demo
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    c = recipe.base_config("Cnn10", arg)
    # A narrow Cnn10 (1/16 of its operations) with a 128-d embedding.
    c.model_overrides.widths = (16, 32, 64, 128)
    c.model_overrides.embedding_size = 128
    c.dataset = "panns_demo"
    c.train_split, c.eval_split = "train", "eval"
    c.clip_seconds = 2.0
    c.batch_size = 32
    c.eval_batch_size = 32
    c.num_train_steps = 200
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 20
    return c
