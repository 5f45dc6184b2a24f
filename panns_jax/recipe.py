"""The paper's training recipe and its ablations, shared by every config file.

Kong et al. 2020, Sec. IV: batch 32, Adam (AMSGrad) lr 1e-3, BCE on sigmoid outputs,
mixup alpha 1 on the log-mel, SpecAugment, balanced sampling, 600k iterations,
evaluation every 2,000 iterations (golden/TRAINING.md §1, §8).

The files in ``configs/`` call :func:`base_config`. Config arguments
(``--config=configs/cnn14.py:ARG``, comma-separated ``key=value``):
  mixup=logmel|wave|none   where mixup happens (none: no mixup)
  specaug=0                no SpecAugment
  dropout=0                no dropout after the conv blocks
  sampling=balanced|full   balanced sampler or plain shuffling of the full data
  sr=32k|16k|8k            sample rate (window and hop scale with it)
  mel=32|64|128            mel bins
  emb=32|128|512|2048      embedding size (fc1 width)
  hop=N                    hop size in samples
  data_fraction=F          train on a seeded subset of this fraction of the training data
  clips_per_class=N        train on N seeded clips of each class (single-label data)
  head=max|avg|att         decision-level (SED) head of Cnn14 (Cnn14_DecisionLevel*)
  runlocal                 tiny settings for a quick local smoke run
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections

# The paper's four transfer systems (Sec. V); panns_jax/transfer.py implements them.
STRATEGIES = ("scratch", "finetune", "freeze_l1", "freeze_l3")


class ConfigError(ValueError):
    """A config value that cannot be trained with. The message names it and what to do.

    The binaries (``panns_jax.main``, ``panns_jax.crossval``) print it as one line and
    exit with status 2 instead of a traceback.
    """


def parse_flags(argv: Sequence[str]) -> List[str]:
    """absl ``flags_parser`` of the training binaries: a bad flag or a config file that
    refuses its arguments (``esc50.py:fold=99``) is one ``error:`` line and exit 2.

    ml_collections wraps an exception of ``get_config`` in a flags error holding the
    whole traceback. Only its last line, the exception itself, is worth printing.
    """
    from absl import flags

    try:
        return flags.FLAGS(list(argv))
    except flags.Error as err:
        text = str(err)
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        message = lines[0] if lines else type(err).__name__
        if "Error whilst parsing config file" in text and len(lines) > 1:
            cause = re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
            message = message.split(": Error whilst parsing", 1)[0] + ": " + cause
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_arg(arg: Optional[str]) -> Dict[str, Any]:
    """'mixup=wave,sr=16k,runlocal' -> {'mixup': 'wave', 'sr': '16k', 'runlocal': True}."""
    result = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.partition("=")
        result[key.strip()] = value.strip() if value else True
    return result


def base_config(
    model: str, arg: Optional[str] = None, family_supports_logmel: bool = True
) -> ml_collections.ConfigDict:
    """The paper's AudioSet recipe for ``model``, changed by the config arguments ``arg``.

    ``family_supports_logmel`` is False for the raw-waveform families, which take no
    front-end arguments. Raises :class:`ConfigError` for an unknown or bad argument.

    The function is long because it is the one flat list of every config field and its
    default, followed by the arguments' overrides, as ml_collections configs are written:
    the whole recipe reads top to bottom in one place.
    """
    args = parse_arg(arg)
    known = {
        "mixup",
        "specaug",
        "dropout",
        "sampling",
        "sr",
        "mel",
        "emb",
        "hop",
        "head",
        "data_fraction",
        "clips_per_class",
        "runlocal",
    }
    unknown = set(args) - known
    if unknown:
        raise ConfigError(f"unknown config argument(s) {sorted(unknown)}; known: {sorted(known)}")

    c = ml_collections.ConfigDict()
    c.model = model
    c.model_overrides = ml_collections.ConfigDict()
    c.dataset = "audioset/32k"
    # TFDS data dir (default ~/tensorflow_datasets).
    c.data_dir = ml_collections.config_dict.placeholder(str)
    c.train_split = "balanced_train"  # The paper's full data: a pack of balanced + unbalanced.
    c.eval_split = "eval"
    c.task = "multilabel"  # Paper: tagging (BCE on sigmoids); transfer sets: 'singlelabel'.
    c.train_folds = ml_collections.config_dict.placeholder(tuple)  # Folds of ESC-50-like sets.
    c.eval_folds = ml_collections.config_dict.placeholder(tuple)
    c.clip_seconds = 10.0
    c.balanced = args.get("sampling", "balanced") == "balanced"
    c.data_fraction = float(args.get("data_fraction", 1.0))  # Paper Sec. V: less training data.
    # Paper Figs. 6-11: transfer accuracy against the number of training clips per class.
    c.clips_per_class = ml_collections.config_dict.placeholder(int)
    if "clips_per_class" in args:
        c.clips_per_class = _int_arg(args["clips_per_class"], "clips_per_class")
    # Score a recording longer than clip_seconds by the mean over its segments (DCASE 2018
    # Task 2, Sec. VI-D); False: its first clip_seconds.
    c.eval_segments = False
    c.batch_size = 32  # Paper: 32 clips per step (the loader delivers 64 with mixup).
    c.eval_batch_size = 32
    c.learning_rate = 1e-3  # Paper: Adam, lr 1e-3, AMSGrad.
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
    c.grad_clip_norm = ml_collections.config_dict.placeholder(float)  # Paper: no clipping.
    c.mixup = args.get("mixup", "logmel")  # Paper: mixup alpha = 1 on the log-mel.
    c.mixup_alpha = 1.0
    c.num_train_steps = 600_000  # Paper: results reported at 600k iterations.
    c.eval_every = 2_000
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 2
    c.log_every = 100
    c.seed = 0
    c.num_devices = ml_collections.config_dict.placeholder(int)  # Default: all devices.
    c.compute_dtype = "float32"  # or 'bfloat16' (parameters stay float32)
    # 'auto': oneDNN's CPU convolutions where installed (pip install 'panns-jax[onednn]';
    # 1.1-1.4x faster train steps, benchmarks/train_step.py), else XLA's; or 'xla' / 'onednn'.
    # Other devices ignore it (panns_jax.models.backends).
    c.conv_backend = "auto"
    # e.g. 2**20: shard every weight of >= 1M elements FSDP-style.
    c.fsdp_min_size = ml_collections.config_dict.placeholder(int)

    m = c.model_overrides
    if c.mixup not in ("logmel", "wave", "none"):
        raise ConfigError(f"mixup must be logmel, wave or none, got {c.mixup!r}")
    if family_supports_logmel:
        if c.mixup == "wave":
            m.mixup_domain = "waveform"
        if str(args.get("specaug", "1")) == "0":
            m.spec_augment = False
        frontend = {}
        sr = args.get("sr", "32k")
        rates = {
            "32k": (32000, 1024, 320, 14000),
            "16k": (16000, 512, 160, 8000),
            "8k": (8000, 256, 80, 4000),
        }
        if sr not in rates:
            raise ConfigError(f"sr must be one of {sorted(rates)}, got {sr!r}")
        if sr != "32k":
            rate, window, hop, fmax = rates[sr]
            frontend.update(sample_rate=rate, window_size=window, hop_size=hop, fmax=fmax)
            c.dataset = f"audioset/{sr}"
        if "mel" in args:
            frontend["mel_bins"] = int(args["mel"])
        if "hop" in args:
            frontend["hop_size"] = int(args["hop"])
        if frontend:
            from panns_jax.frontend import FrontendConfig

            m.frontend = FrontendConfig(**frontend)
    if str(args.get("dropout", "1")) == "0":
        m.trunk_dropout = 0.0
    if "emb" in args:
        m.embedding_size = int(args["emb"])
    if "head" in args:
        heads = {
            "max": "Cnn14_DecisionLevelMax",
            "avg": "Cnn14_DecisionLevelAvg",
            "att": "Cnn14_DecisionLevelAtt",
        }
        if model != "Cnn14" or args["head"] not in heads:
            raise ConfigError(f"head={args['head']} is a Cnn14 option: one of {sorted(heads)}")
        c.model = heads[args["head"]]
    if args.get("runlocal"):
        c.dataset = "panns_demo"
        c.train_split, c.eval_split = "train", "eval"
        c.clip_seconds = 2.0
        c.batch_size, c.eval_batch_size = 4, 8
        c.num_train_steps, c.eval_every, c.checkpoint_every, c.log_every = 4, 2, 2, 1
    return c


def _int_arg(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config argument {name} must be an integer, got {value!r}") from None


def transfer_config(
    dataset: str,
    *,
    clip_seconds: float,
    num_folds: Optional[int] = None,
    splits: Optional[Sequence[str]] = None,
    arg: Optional[str] = None,
    model: str = "Cnn14",
) -> ml_collections.ConfigDict:
    """A transfer run (Sec. V) on one of the paper's single-label transfer sets.

    A set with folds (ESC-50, GTZAN, RAVDESS: ``num_folds``) is one split whose folds select
    the training and held-out clips. A set with published splits (DCASE 2019 Task 1, DCASE
    2018 Task 2, MSoS: ``splits=(train, test)``) trains on the first and evaluates on the
    second; it has no folds, so ``fold=`` and cross-validation are refused.

    The pretrained model is ``config.transfer.checkpoint``, a placeholder to fill with
    ``--config.transfer.checkpoint=DIR_OR_PTH`` (see ``panns_jax/transfer.py``).
    Config arguments, besides those of :func:`base_config` (e.g. ``mixup=none``):
      strategy=scratch|finetune|freeze_l1|freeze_l3   the paper's four systems
      fold=K                   held-out fold (train on the others); `crossval cv` runs all
      steps=N                  training steps (default 10,000)

    The recipe is that of the authors' transfer code (panns_transfer_to_gtzan). It trains
    with Adam at lr 1e-4 (AMSGrad here, as in the pretraining), batch 32, mixup on the
    log-mel, uniform sampling and softmax cross-entropy on one label per clip.
    """
    if (num_folds is None) == (splits is None):
        raise ValueError(f"{dataset}: give transfer_config either num_folds or splits")
    args = parse_arg(arg)
    strategy = args.pop("strategy", "finetune")
    fold = args.pop("fold", None)
    steps = _int_arg(args.pop("steps", 10_000), "steps")
    if steps < 1:
        raise ConfigError(f"steps must be a positive number of training steps, got {steps}")
    if args.get("runlocal") or "head" in args:
        raise ConfigError("transfer configs take no runlocal/head argument")
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    c = base_config(model, ",".join(f"{k}={v}" for k, v in args.items()))
    c.dataset = f"{dataset}/{args.get('sr', '32k')}"
    if splits is not None:
        if fold is not None:
            raise ConfigError(
                f"fold={fold}: {dataset} has no folds; it trains on split {splits[0]!r} and "
                f"evaluates on {splits[1]!r}: drop the fold argument"
            )
        c.train_split, c.eval_split = splits
    else:
        fold = _int_arg(1 if fold is None else fold, "fold")
        if not 1 <= fold <= num_folds:
            raise ConfigError(f"fold must be in 1..{num_folds}, got {fold}")
        c.train_split = c.eval_split = "train"  # One split; folds select train / held-out clips.
        c.train_folds = tuple(f for f in range(1, num_folds + 1) if f != fold)
        c.eval_folds = (fold,)
    c.clip_seconds = clip_seconds
    c.task = "singlelabel"
    c.balanced = args.get("sampling", "full") == "balanced"
    c.learning_rate = 1e-4
    c.num_train_steps = steps
    c.eval_every = c.checkpoint_every = min(1_000, steps)
    c.log_every = 100
    c.transfer = ml_collections.ConfigDict()
    c.transfer.strategy = strategy
    c.transfer.checkpoint = ml_collections.config_dict.placeholder(str)
    c.transfer.hidden_size = ml_collections.config_dict.placeholder(int)  # Freeze_L3 width.
    # None for a set with published splits: it has no folds to cross-validate over.
    c.transfer.num_folds = ml_collections.config_dict.placeholder(int)
    c.transfer.fold = ml_collections.config_dict.placeholder(int)
    if num_folds is not None:
        c.transfer.num_folds, c.transfer.fold = num_folds, fold
    return c


@dataclasses.dataclass(frozen=True)
class TransferSet:
    """The paper's protocol for one of its transfer sets (Sec. VI-D): the TFDS builder, the
    clip length, and folds to cross-validate or published (train, test) splits.

    ``configs/<name>.py`` and ``panns-jax probe <name>`` both read it from
    :data:`TRANSFER_SETS`.
    """

    dataset: str
    clip_seconds: float
    num_folds: Optional[int] = None
    splits: Optional[Tuple[str, str]] = None
    eval_segments: bool = False  # Score a clip by its segments' mean (DCASE 2018 Task 2).


TRANSFER_SETS = {
    "esc50": TransferSet("esc50", 5.0, num_folds=5),
    "gtzan": TransferSet("gtzan_genres", 30.0, num_folds=10),
    "ravdess": TransferSet("ravdess", 5.0, num_folds=4),
    "dcase2019_task1": TransferSet("dcase2019_task1", 10.0, splits=("train", "test")),
    "dcase2018_task2": TransferSet(
        "dcase2018_task2", 4.0, splits=("train", "test"), eval_segments=True
    ),
    "msos": TransferSet("msos", 4.0, splits=("train", "test")),
}


def transfer_set_config(name: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """:func:`transfer_config` with the protocol of the transfer set ``name``
    (:data:`TRANSFER_SETS`)."""
    found = TRANSFER_SETS[name]
    config = transfer_config(
        found.dataset,
        clip_seconds=found.clip_seconds,
        num_folds=found.num_folds,
        splits=found.splits,
        arg=arg,
    )
    config.eval_segments = found.eval_segments
    return config


def mixup_alpha(config: ml_collections.ConfigDict) -> Optional[float]:
    """The Beta(alpha, alpha) parameter of mixup, or None when the config mixes nothing."""
    return None if config.mixup == "none" else float(config.mixup_alpha)


def examples_per_step(config: ml_collections.ConfigDict) -> int:
    """Clips the loader delivers per step: two per mixed pair under mixup, else one per row."""
    return config.batch_size * (1 if config.mixup == "none" else 2)


def clip_samples(config: ml_collections.ConfigDict, sample_rate: int) -> int:
    """Samples in one training or evaluation clip of ``config.clip_seconds`` at ``sample_rate``."""
    return int(round(config.clip_seconds * sample_rate))
