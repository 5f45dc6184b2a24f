"""Fine-tune on your own audio: a folder per class (DATA/<class>/**/<audio>) or a CSV/TSV
manifest (file, label[, fold | split]); ``panns-jax finetune`` as a config.

    python -m panns_jax.main --config=configs/custom.py:data=DATA,strategy=finetune \
        --workdir=DIR
    python -m panns_jax.crossval cv --config=configs/custom.py:data=DATA/labels.csv,... \
        --workdir=DIR                                            # a manifest with folds

Arguments besides transfer_config's (strategy, fold, steps, mixup, ...): model=NAME_OR_PATH
(a zoo name, a checkpoint directory or a .pth; default Cnn14), arch=NAME (a .pth's
architecture), holdout=F (default 0.1), seed=N, max_bad_fraction=F, clip_seconds=S,
data_dir=DIR (where the records are built; default TFDS's). See panns_jax/finetune.py.
"""

from typing import Optional

import ml_collections

from panns_jax import finetune


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return finetune.config_from_arg(arg)
