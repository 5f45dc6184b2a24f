"""GTZAN genres transfer (Kong et al. 2020, Sec. VI-D, Table XVII): 10 genres, 10-fold CV,
30 s clips (``fold`` = track number mod 10 + 1, see panns_jax/data/transfer.py).

    python -m panns_jax.crossval cv --config=configs/gtzan.py:strategy=finetune \
        --config.transfer.checkpoint=CKPT --workdir=DIR
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("gtzan", arg)
