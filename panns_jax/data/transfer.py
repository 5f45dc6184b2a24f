"""Transfer-learning sets of the PANNs paper (Sec. VI-D), from their usual downloads.

All store mono int16 `audio` at the config's rate and at the clip's own length (ESC-50
5 s, GTZAN ~30 s, RAVDESS ~3-5 s, DCASE 2019 Task 1 10 s, DCASE 2018 Task 2 0.3-30 s,
MSoS 4 s), which the pipeline crops or pads, with `label` (ClassLabel) and `audio_id` (the
file name as the download's csv or folder gives it), in file order.

* ESC-50, GTZAN and RAVDESS are one 'train' split with a `fold` for cross-validation
  (`make_train_iterator(..., folds=[1, 2, 3, 4])`); evaluation folds are chosen with `folds=`.
* DCASE 2019 Task 1, DCASE 2018 Task 2 and MSoS have the published 'train' and 'test'
  splits, and no folds.
"""

from __future__ import annotations

import csv
import functools
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


def _features(
    sample_rate: int, names, extra=None, folds: bool = True
) -> tfds.features.FeaturesDict:
    fold = {"fold": tfds.features.Scalar(dtype=np.int32)} if folds else {}
    return tfds.features.FeaturesDict(
        {
            "audio": common.audio_feature(sample_rate, None),
            "label": tfds.features.ClassLabel(names=names),
            "audio_id": tfds.features.Text(),
            **fold,
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
    HAS_FOLDS = True

    def _info_kwargs(self):
        return dict(
            description=self.__doc__,
            features=_features(
                self.sample_rate, self.CLASSES, self._extra_features(), folds=self.HAS_FOLDS
            ),
            supervised_keys=("audio", "label"),
            homepage=self.HOMEPAGE,
        )

    def _extra_features(self) -> Dict[str, Any]:
        return {}

    def _is_root(self, folder: str) -> bool:
        raise NotImplementedError

    def _find_root(self, dl_manager, is_root=None, missing: str = "") -> str:
        """The first folder of the manual download that ``is_root`` accepts.

        Raises FileNotFoundError, naming ``missing`` and the download, when none does.
        """
        root = _find(os.fspath(dl_manager.manual_dir), is_root or self._is_root)
        if root is None:
            raise FileNotFoundError(
                f"{missing or self.MISSING} not found in {dl_manager.manual_dir}. "
                + self.MANUAL_DOWNLOAD_INSTRUCTIONS
            )
        return root

    def _split_generators(self, dl_manager):
        root = self._find_root(dl_manager)
        return {"train": self._generate_examples("train", self._candidates(root))}


class _TrainTestBuilder(_SingleLabelBuilder, skip_registration=True):
    """A single-label set with the published 'train' and 'test' splits, and no folds.

    ``_roots(dl_manager)`` finds each split's folder (by default both are the one folder
    that ``_is_root`` accepts), and ``_candidates(root, split)`` lists the split's files.
    """

    HAS_FOLDS = False
    SPLITS = ("train", "test")

    def _roots(self, dl_manager) -> Dict[str, str]:
        root = self._find_root(dl_manager)
        return {split: root for split in self.SPLITS}

    def _candidates(self, root: str, split: str) -> List[common.Candidate]:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        roots = self._roots(dl_manager)
        return {
            split: self._generate_examples(split, self._candidates(roots[split], split))
            for split in self.SPLITS
        }

    def _labelled(self, path: str, label: Any, audio_id: str, **extra: Any) -> Dict[str, Any]:
        """The example of the file ``path`` with class name ``label``.

        Raises BadExample for a label outside ``CLASSES``.
        """
        if label not in self.CLASSES:
            raise common.BadExample(f"unknown label: {label!r}")
        return {
            "audio": audio_io.load_int16(path, self.sample_rate),
            "label": self.CLASSES.index(label),
            "audio_id": audio_id,
            **extra,
        }


def _read_table(path: str, columns: Sequence[str], delimiter: str = ",") -> List[Dict[str, str]]:
    """The rows of the csv ``path`` (a header line, then one row a line) as dicts.

    The header must name every one of ``columns`` exactly (in any order, other columns
    allowed). Raises ValueError, naming the file and the missing columns, otherwise.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            sep = "tab" if delimiter == "\t" else repr(delimiter)
            raise ValueError(
                f"{path}: no column {missing} in its header {header} ({sep}-separated); "
                f"expected the published columns {list(columns)}"
            )
        reader.fieldnames = header
        return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


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


DCASE2019_SCENES = (
    "airport",
    "bus",
    "metro",
    "metro_station",
    "park",
    "public_square",
    "shopping_mall",
    "street_pedestrian",
    "street_traffic",
    "tram",
)
DCASE2018_CLASSES = (
    "Acoustic_guitar",
    "Applause",
    "Bark",
    "Bass_drum",
    "Burping_or_eructation",
    "Bus",
    "Cello",
    "Chime",
    "Clarinet",
    "Computer_keyboard",
    "Cough",
    "Cowbell",
    "Double_bass",
    "Drawer_open_or_close",
    "Electric_piano",
    "Fart",
    "Finger_snapping",
    "Fireworks",
    "Flute",
    "Glockenspiel",
    "Gong",
    "Gunshot_or_gunfire",
    "Harmonica",
    "Hi-hat",
    "Keys_jangling",
    "Knock",
    "Laughter",
    "Meow",
    "Microwave_oven",
    "Oboe",
    "Saxophone",
    "Scissors",
    "Shatter",
    "Snare_drum",
    "Squeak",
    "Tambourine",
    "Tearing",
    "Telephone",
    "Trumpet",
    "Violin_or_fiddle",
    "Writing",
)
MSOS_CATEGORIES = ("Nature", "Music", "Human", "Effects", "Urban")


class Dcase2019Task1(_TrainTestBuilder):
    """DCASE 2019 Task 1 subtask A: TAU Urban Acoustic Scenes 2019, development set.

    10 scenes, 10 s clips recorded at 48 kHz in stereo, which decoding averages to mono
    (the paper's choice). 'train' is the fold-1 training list (9,185 clips) and 'test' the
    fold-1 evaluation list (4,185). Its csv files are tab-separated and name each file
    `audio/<name>.wav`, relative to the folder of `meta.csv`; `audio_id` is that name.
    `identifier` (the recording location, e.g. 'barcelona-0', from meta.csv) is stored too.
    A listed file that meta.csv lacks, or describes with another scene, is skipped.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unzip TAU-urban-acoustic-scenes-2019-development.meta.zip and "
        "TAU-urban-acoustic-scenes-2019-development.audio.{1..21}.zip from "
        "https://zenodo.org/record/2589280 into manual_dir, giving "
        "TAU-urban-acoustic-scenes-2019-development/meta.csv, "
        "evaluation_setup/fold1_train.csv, evaluation_setup/fold1_evaluate.csv and audio/*.wav."
    )

    CLASSES = DCASE2019_SCENES
    HOMEPAGE = "https://dcase.community/challenge2019/task-acoustic-scene-classification"
    MISSING = "meta.csv beside evaluation_setup/fold1_train.csv and fold1_evaluate.csv"
    LISTS = {"train": "fold1_train.csv", "test": "fold1_evaluate.csv"}

    def _extra_features(self) -> Dict[str, Any]:
        return {"identifier": tfds.features.Text()}

    def _is_root(self, folder: str) -> bool:
        setup = os.path.join(folder, "evaluation_setup")
        return os.path.isfile(os.path.join(folder, "meta.csv")) and all(
            os.path.isfile(os.path.join(setup, name)) for name in self.LISTS.values()
        )

    def _candidates(self, root: str, split: str) -> List[common.Candidate]:
        meta_rows = _read_table(
            os.path.join(root, "meta.csv"), ("filename", "scene_label", "identifier"), "\t"
        )
        meta = {row["filename"]: row for row in meta_rows}
        listed = _read_table(
            os.path.join(root, "evaluation_setup", self.LISTS[split]),
            ("filename", "scene_label"),
            "\t",
        )
        return [
            (row["filename"] or "?", functools.partial(self._example, root, meta, row))
            for row in listed
        ]

    def _example(self, root: str, meta: Dict[str, Dict[str, str]], row: Dict[str, str]):
        name, scene = row["filename"], row["scene_label"]
        path = common.path_below(root, name)
        described = meta.get(name)
        if described is None:
            raise common.BadExample(f"not in meta.csv: {name!r}")
        if described["scene_label"] != scene:
            raise common.BadExample(
                f"unknown label: {scene!r}, where meta.csv says {described['scene_label']!r}"
            )
        return self._labelled(path, scene, name, identifier=described["identifier"])


class Dcase2018Task2(_TrainTestBuilder):
    """DCASE 2018 Task 2: FSDKaggle2018, Freesound clips of 0.3-30 s at 44.1 kHz, 41 classes.

    'train' is FSDKaggle2018.meta/train_post_competition.csv (9,473 clips, not all of their
    labels manually verified) and 'test' test_post_competition_scoring_clips.csv (the 1,600
    scored test clips), comma-separated with `fname` and `label` columns. The audio lies in
    FSDKaggle2018.audio_train/ and FSDKaggle2018.audio_test/; `audio_id` is `fname`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unzip FSDKaggle2018.audio_train.zip, FSDKaggle2018.audio_test.zip and "
        "FSDKaggle2018.meta.zip from https://zenodo.org/record/2552860 into one folder of "
        "manual_dir, giving FSDKaggle2018.audio_train/, FSDKaggle2018.audio_test/ and "
        "FSDKaggle2018.meta/train_post_competition.csv, "
        "FSDKaggle2018.meta/test_post_competition_scoring_clips.csv."
    )

    CLASSES = DCASE2018_CLASSES
    HOMEPAGE = "https://zenodo.org/record/2552860"
    MISSING = "FSDKaggle2018.meta/ beside FSDKaggle2018.audio_train/ and FSDKaggle2018.audio_test/"
    # Per split: its csv in FSDKaggle2018.meta/ and its audio folder.
    TABLES = {
        "train": ("train_post_competition.csv", "FSDKaggle2018.audio_train"),
        "test": ("test_post_competition_scoring_clips.csv", "FSDKaggle2018.audio_test"),
    }

    def _is_root(self, folder: str) -> bool:
        return all(
            os.path.isfile(os.path.join(folder, "FSDKaggle2018.meta", table))
            and os.path.isdir(os.path.join(folder, audio))
            for table, audio in self.TABLES.values()
        )

    def _candidates(self, root: str, split: str) -> List[common.Candidate]:
        table, audio = self.TABLES[split]
        rows = _read_table(os.path.join(root, "FSDKaggle2018.meta", table), ("fname", "label"))
        folder = os.path.join(root, audio)
        return [
            (row["fname"] or "?", functools.partial(self._example, folder, row)) for row in rows
        ]

    def _example(self, folder: str, row: Dict[str, str]) -> Dict[str, Any]:
        path = common.path_below(folder, row["fname"])
        return self._labelled(path, row["label"], row["fname"])


class Msos(_TrainTestBuilder):
    """Making Sense of Sounds (MSoS) challenge 2018: 4 s clips of 5 categories.

    'train' is the development set (1,500 clips, Development/<Category>/<File>, listed in
    Logsheet_Development.csv) and 'test' the evaluation set (500 clips, Evaluation/<File>,
    labelled in Logsheet_EvaluationMaster.csv, released after the challenge). The two
    downloads may lie in different folders of manual_dir. `audio_id` is the logsheet's File.

    The logsheets are read as comma-separated with a header naming the columns `File` and
    `Category` (exact names, any order). The published ones have the columns Category,
    Event, File (development) and File, Event, Category (evaluation), as the public code
    that reads them uses them; `Event`, the sound type within a category, is not stored.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Unzip the development and evaluation sets of the Making Sense of Sounds challenge "
        "(https://cvssp.org/projects/making_sense_of_sounds/site/challenge/) into manual_dir, "
        "giving Logsheet_Development.csv beside Development/<Category>/*.wav, and the "
        "evaluation labels Logsheet_EvaluationMaster.csv beside Evaluation/*.wav."
    )

    CLASSES = MSOS_CATEGORIES
    HOMEPAGE = "https://cvssp.org/projects/making_sense_of_sounds/site/challenge/"
    # Per split: its logsheet and the audio folder beside it.
    LOGSHEETS = {
        "train": ("Logsheet_Development.csv", "Development"),
        "test": ("Logsheet_EvaluationMaster.csv", "Evaluation"),
    }

    def _roots(self, dl_manager) -> Dict[str, str]:
        def finder(sheet, audio):
            return lambda d: (
                os.path.isfile(os.path.join(d, sheet)) and os.path.isdir(os.path.join(d, audio))
            )

        return {
            split: self._find_root(dl_manager, finder(sheet, audio), f"{sheet} beside {audio}/")
            for split, (sheet, audio) in self.LOGSHEETS.items()
        }

    def _candidates(self, root: str, split: str) -> List[common.Candidate]:
        sheet, audio = self.LOGSHEETS[split]
        rows = _read_table(os.path.join(root, sheet), ("File", "Category"))
        folder = os.path.join(root, audio)
        return [
            (row["File"] or "?", functools.partial(self._example, folder, split, row))
            for row in rows
        ]

    def _example(self, folder: str, split: str, row: Dict[str, str]) -> Dict[str, Any]:
        category, name = row["Category"], row["File"]
        if category not in self.CLASSES:
            raise common.BadExample(f"unknown label: {category!r}")
        relative = f"{category}/{name}" if split == "train" else name
        return self._labelled(common.path_below(folder, relative), category, name)
