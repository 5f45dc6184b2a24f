"""Making Sense of Sounds (MSoS) 2018 transfer (Kong et al. 2020, Sec. VI-D 4, Table XVI):
5 categories (Nature, Music, Human, Effects, Urban), trained on the 1,500 development clips
and evaluated on the 500 evaluation clips, all 4 s. Metric: accuracy.

    python -m panns_jax.main --config=configs/msos.py:strategy=finetune \
        --config.transfer.checkpoint=CKPT --workdir=DIR

The set has no folds, so ``fold=`` and ``python -m panns_jax.crossval cv`` are refused.
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("msos", arg)
