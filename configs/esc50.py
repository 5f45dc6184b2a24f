"""ESC-50 transfer (Kong et al. 2020, Sec. VI-D, Table XIII): 50 classes, 5 folds, 5 s clips.

    python -m panns_jax.crossval cv --config=configs/esc50.py:strategy=freeze_l1 \
        --config.transfer.checkpoint=CKPT --workdir=DIR          # 5-fold CV accuracy
    python -m panns_jax.main --config=configs/esc50.py:strategy=finetune,fold=2 \
        --config.transfer.checkpoint=CKPT --workdir=DIR          # one fold

CKPT: a panns_jax checkpoint directory or an original ``Cnn14_mAP=0.431.pth``.
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.transfer_set_config("esc50", arg)
