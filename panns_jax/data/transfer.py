"""Transfer-learning sets of the PANNs paper (Sec. V), from their usual downloads.

All store mono int16 `audio` at the config's rate and at the clip's own length (ESC-50
5 s, GTZAN ~30 s, RAVDESS ~3-5 s), which the pipeline crops or pads. They also store
`label` (ClassLabel), `audio_id` (the file name) and `fold` for cross-validation
(`make_train_iterator(..., folds=[1, 2, 3, 4])`). Each set is a single 'train' split in
file order. Evaluation folds are chosen with `folds=`.
"""

from __future__ import annotations

import csv
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from panns_jax.data import audio_io, common

ESC50_CLASSES = (
    "dog",
    "rooster",
    "pig",
    "cow",
    "frog",
    "cat",
    "hen",
    "insects",
    "sheep",
    "crow",
    "rain",
    "sea_waves",
    "crackling_fire",
    "crickets",
    "chirping_birds",
    "water_drops",
    "wind",
    "pouring_water",
    "toilet_flush",
    "thunderstorm",
    "crying_baby",
    "sneezing",
    "clapping",
    "breathing",
    "coughing",
    "footsteps",
    "laughing",
    "brushing_teeth",
    "snoring",
    "drinking_sipping",
    "door_wood_knock",
    "mouse_click",
    "keyboard_typing",
    "door_wood_creaks",
    "can_opening",
    "washing_machine",
    "vacuum_cleaner",
    "clock_alarm",
    "clock_tick",
    "glass_breaking",
    "helicopter",
    "chainsaw",
    "siren",
    "car_horn",
    "engine",
    "train",
    "church_bells",
    "airplane",
    "fireworks",
    "hand_saw",
)
ESC50_FOLDS = 5  # The official folds of ESC-50 (Piczak 2015).
GTZAN_GENRES = (
    "blues",
    "classical",
    "country",
    "disco",
    "hiphop",
    "jazz",
    "metal",
    "pop",
    "reggae",
    "rock",
)
RAVDESS_EMOTIONS = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")


def _find(root: str, predicate, max_depth: int = 3) -> Optional[str]:
    """First folder (breadth-first, sorted) below root satisfying predicate."""
    level = [root]
    for _ in range(max_depth + 1):
        for d in level:
            if predicate(d):
                return d
        level = [
            os.path.join(d, s)
            for d in level
            for s in sorted(os.listdir(d))
            if os.path.isdir(os.path.join(d, s))
        ]
    return None


def _features(sample_rate: int, names, extra=None) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "audio": common.audio_feature(sample_rate, None),
            "label": tfds.features.ClassLabel(names=names),
            "audio_id": tfds.features.Text(),
            "fold": tfds.features.Scalar(dtype=np.int32),
            **(extra or {}),
        }
    )


class _SingleLabelBuilder(common.PannsBuilder, skip_registration=True):
    """A single-label set with folds.

    Each example has a ``label``, one of ``CLASSES``, and a ``fold``. The files lie below
    the first folder of the manual download that ``_is_root`` accepts (``MISSING`` names
    it), and ``_candidates(root)`` lists them. RAVDESS, whose files lie in many Actor_XX
    folders, gathers them in its own ``_split_generators``.
    """

    CLASSES: Sequence[str] = ()
    HOMEPAGE = ""
    MISSING = ""

    def _info_kwargs(self):
        return dict(
            description=self.__doc__,
            features=_features(self.sample_rate, self.CLASSES, self._extra_features()),
            supervised_keys=("audio", "label"),
            homepage=self.HOMEPAGE,
        )

    def _extra_features(self) -> Dict[str, Any]:
        return {}

    def _is_root(self, folder: str) -> bool:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        root = _find(os.fspath(dl_manager.manual_dir), self._is_root)
        if root is None:
            raise FileNotFoundError(
                f"{self.MISSING} not found in {dl_manager.manual_dir}. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return {"train": self._generate_examples("train", self._candidates(root))}


class Esc50(_SingleLabelBuilder):
    """ESC-50 (Piczak 2015): 2000 5 s clips, 50 classes, 5 official folds."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unzip https://github.com/karolpiczak/ESC-50/archive/master.zip into "
        "manual_dir (giving ESC-50-master/meta/esc50.csv and "
        "ESC-50-master/audio/*.wav)."
    )

    CLASSES = ESC50_CLASSES
    HOMEPAGE = "https://github.com/karolpiczak/ESC-50"
    MISSING = "meta/esc50.csv"

    def _is_root(self, folder: str) -> bool:
        return os.path.isfile(os.path.join(folder, "meta", "esc50.csv"))

    def _candidates(self, root: str) -> Iterator[common.Candidate]:
        sr = self.sample_rate
        with open(os.path.join(root, "meta", "esc50.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:

            def make(row=row):
                category = row.get("category")
                if category not in ESC50_CLASSES:
                    raise common.BadExample(f"unknown label: {category!r}")
                if str(row.get("target")).strip() != str(ESC50_CLASSES.index(category)):
                    raise common.BadExample(
                        f"unknown label: target {row['target']} != {category!r}"
                    )
                path = common.path_below(os.path.join(root, "audio"), row.get("filename"))
                fold = str(row.get("fold") or "").strip()
                if not fold.isdigit() or not 1 <= int(fold) <= ESC50_FOLDS:
                    raise common.BadExample(
                        f"bad fold: {row.get('fold')!r} (ESC-50 folds are 1..{ESC50_FOLDS})"
                    )
                return {
                    "audio": audio_io.load_int16(path, sr),
                    "label": ESC50_CLASSES.index(category),
                    "audio_id": row["filename"],
                    "fold": int(fold),
                }

            yield row.get("filename", "?"), make


class GtzanGenres(_SingleLabelBuilder):
    """GTZAN genre collection (Tzanetakis & Cook 2002): 1000 30 s clips.

    `fold` = track number mod 10 + 1, a fixed 10-fold split for cross-validation. GTZAN
    has no official folds. Each fold holds 10 tracks of every genre. The set is named
    gtzan_genres to leave TFDS's own `gtzan` alone.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract the GTZAN archive into manual_dir: genres/<genre>/"
        "<genre>.000NN.{au,wav} (original) or genres_original/<genre>/... "
        "(Kaggle copy)."
    )

    CLASSES = GTZAN_GENRES
    HOMEPAGE = "http://marsyas.info/downloads/datasets.html"
    MISSING = "genres/ folder"

    def _is_root(self, folder: str) -> bool:
        return os.path.basename(folder) in ("genres", "genres_original")

    def _candidates(self, root: str) -> Iterator[common.Candidate]:
        sr = self.sample_rate
        for genre in sorted(os.listdir(root)):
            folder = os.path.join(root, genre)
            if not os.path.isdir(folder):
                continue
            for fn in sorted(os.listdir(folder)):
                if os.path.splitext(fn)[1].lower() not in audio_io.AUDIO_EXTENSIONS:
                    continue

                def make(genre=genre, fn=fn):
                    if genre not in GTZAN_GENRES:
                        raise common.BadExample(f"unknown label: genre folder {genre!r}")
                    number = re.search(r"(\d+)\.[^.]+$", fn)
                    return {
                        "audio": audio_io.load_int16(os.path.join(root, genre, fn), sr),
                        "label": GTZAN_GENRES.index(genre),
                        "audio_id": fn,
                        "fold": int(number.group(1)) % 10 + 1 if number else 1,
                    }

                yield f"{genre}/{fn}", make


class Ravdess(_SingleLabelBuilder):
    """RAVDESS speech and song audio (Livingstone & Russo 2018), 8 emotions.

    Files are Actor_XX/MM-VV-EE-II-SS-RR-AA.wav (modality 03 = audio only, vocal
    channel 01 speech / 02 song, EE emotion 01-08, AA actor). `actor` (1-24) is
    stored, and `fold` = (actor - 1) // 6 + 1 gives 4 speaker-independent folds.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unzip Audio_Speech_Actors_01-24.zip (and optionally "
        "Audio_Song_Actors_01-24.zip) from https://zenodo.org/record/1188976 "
        "into manual_dir, giving Actor_01/ ... Actor_24/."
    )

    CLASSES = RAVDESS_EMOTIONS
    HOMEPAGE = "https://zenodo.org/record/1188976"

    def _extra_features(self) -> Dict[str, Any]:
        return {
            "actor": tfds.features.Scalar(dtype=np.int32),
            "vocal_channel": tfds.features.ClassLabel(names=["speech", "song"]),
        }

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        files: List[str] = []
        for dirpath, dirnames, filenames in os.walk(manual):
            dirnames.sort()
            if re.match(r"Actor_\d+$", os.path.basename(dirpath)):
                files += [
                    os.path.join(dirpath, fn)
                    for fn in sorted(filenames)
                    if os.path.splitext(fn)[1].lower() in audio_io.AUDIO_EXTENSIONS
                ]
        if not files:
            raise FileNotFoundError(
                f"No Actor_XX/ folders in {manual}. " + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        files.sort(key=os.path.basename)
        return {"train": self._generate_examples("train", self._candidates(files))}

    def _candidates(self, files: List[str]) -> Iterator[common.Candidate]:
        sr = self.sample_rate
        for path in files:

            def make(path=path):
                stem = os.path.splitext(os.path.basename(path))[0]
                parts = stem.split("-")
                if len(parts) != 7 or not all(p.isdigit() for p in parts):
                    raise common.BadExample(f"unknown label: bad file name {stem!r}")
                channel, emotion, actor = int(parts[1]), int(parts[2]), int(parts[6])
                if not (1 <= emotion <= 8 and channel in (1, 2)):
                    raise common.BadExample(f"unknown label: {stem!r}")
                return {
                    "audio": audio_io.load_int16(path, sr),
                    "label": emotion - 1,
                    "audio_id": os.path.basename(path),
                    "actor": actor,
                    "fold": (actor - 1) // 6 + 1,
                    "vocal_channel": channel - 1,
                }

            yield os.path.basename(path), make
