"""DCASE 2019 Task 1 subtask A transfer (Kong et al. 2020, Sec. VI-D 2, Table XIV): 10 acoustic
scenes of the TAU Urban Acoustic Scenes 2019 development set, trained on its fold-1 training
list (9,185 clips) and evaluated on its fold-1 evaluation list (4,185), 10 s clips, 48 kHz
stereo averaged to mono as the paper does. Metric: accuracy.

    python -m panns_jax.main --config=configs/dcase2019_task1.py:strategy=finetune \
        --config.transfer.checkpoint=CKPT --workdir=DIR

The set has no folds, so ``fold=`` and ``python -m panns_jax.crossval cv`` are refused.
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("dcase2019_task1", arg)
