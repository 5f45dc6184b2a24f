"""A seconds-long training config: the demo shrunk to batch 4 (8 with mixup) of 1 s clips.

Used by the tests of tests/test_train.py, in process and through ``panns_jax.main``
(whose config loader imports this file; it runs from the project root).
"""

import json
import os

from configs import demo


def get_config(arg=None):
    c = demo.get_config(arg)
    c.batch_size, c.eval_batch_size, c.clip_seconds = 4, 8, 1.0
    c.model_overrides.widths = (8, 16, 32, 64)
    c.model_overrides.embedding_size = 32
    c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 12, 0, 3, 1
    c.keep_checkpoints = 10
    return c


def logged_losses(workdir: str) -> dict:
    """{step: loss} from a run's train_log.jsonl; a resumed run rewrites later steps."""
    losses = {}
    with open(os.path.join(workdir, "train_log.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            losses[record["step"]] = record["loss"]
    return losses
