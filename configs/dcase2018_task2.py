"""DCASE 2018 Task 2 transfer (Kong et al. 2020, Sec. VI-D 3, Table XV): FSDKaggle2018, 41
Freesound classes, clips of 0.3-30 s, trained on its 9,473 training clips and evaluated on the
1,600 clips of its post-competition test set. Metric: mAP@3, which every single-label run
reports as ``map_at_3`` beside accuracy (``panns_jax.metrics.map_at_k``).

    python -m panns_jax.main --config=configs/dcase2018_task2.py:strategy=finetune \
        --config.transfer.checkpoint=CKPT --workdir=DIR

The paper trains on 4 s segments and averages a clip's segment predictions. Here training
crops a random 4 s of each clip (shorter clips are zero-padded), and evaluation scores each
clip by the mean of its 4 s segments' predictions (``config.eval_segments``). The set has no
folds, so ``fold=`` and ``crossval cv`` are refused.
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("dcase2018_task2", arg)
