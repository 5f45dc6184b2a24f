"""RAVDESS emotion transfer (Kong et al. 2020, Sec. VI-D, Table XVIII): 8 emotions,
4 speaker-independent folds (6 actors each), clips of 3-5 s cropped or padded to 5 s.

    python -m panns_jax.crossval cv --config=configs/ravdess.py:strategy=finetune \
        --config.transfer.checkpoint=CKPT --workdir=DIR
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("ravdess", arg)
