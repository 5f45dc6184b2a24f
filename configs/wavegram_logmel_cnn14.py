"""Wavegram_Logmel_Cnn14 with the paper's AudioSet recipe (Kong et al. 2020,
panns_jax/recipe.py).

python -m panns_jax.main --config=configs/wavegram_logmel_cnn14.py --workdir=DIR
python -m panns_jax.main --config=configs/wavegram_logmel_cnn14.py:runlocal --workdir=/tmp/wlc14
"""

from typing import Optional

import ml_collections

from panns_jax import recipe


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    return recipe.base_config("Wavegram_Logmel_Cnn14", arg)
