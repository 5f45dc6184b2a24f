"""A seconds-long training config for the resume test (tests/test_train.py)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import demo  # noqa: E402


def get_config(arg=None):
    c = demo.get_config(arg)
    c.batch_size, c.eval_batch_size, c.clip_seconds = 4, 8, 1.0
    c.model_overrides.widths = (8, 16, 32, 64)
    c.model_overrides.embedding_size = 32
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 12, 0, 3, 1
    c.keep_checkpoints = 10
    return c
