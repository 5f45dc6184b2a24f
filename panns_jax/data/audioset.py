"""`audioset`: AudioSet (Gemmeke et al. 2017) as used by PANNs, from local files.

Reads a manual_dir laid out like the public release plus downloaded audio, or
the packed HDF5 files of the original PANNs code (TRAINING.md Sec. 2).

Each clip stores:

* `audio`: int16 [clip_samples], mono, resampled to the config's rate, zero-padded at
  the end or cut to the first 10 s;
* `labels`: the list of class indices, whose ClassLabel names are the ontology MIDs in
  the order of class_labels_indices.csv (the pipeline makes a 527-way multi-hot);
* `audio_id`: the YouTube id.

Records keep csv (or pack) row order.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from typing import Dict, Iterator, List, Optional

import numpy as np
import tensorflow_datasets as tfds

from panns_jax.audio import audioset_classes
from panns_jax.data import audio_io, common

SPLIT_CSVS = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}
PACK_DIR = os.path.join("hdf5s", "waveforms")

_MANUAL = """\
Put into manual_dir any of:

* the segment lists of the AudioSet release: balanced_train_segments.csv,
  unbalanced_train_segments.csv, eval_segments.csv (3 '#' header lines, then
  `YTID, start_seconds, end_seconds, "mid1,mid2,..."`), and the audio,
  anywhere below manual_dir (subfolders per split are fine), named by YouTube id
  as download scripts write it: Y<id>.<ext>, <id>.<ext>, or
  [Y]<id>_<start>[_<end>].<ext>; any format soundfile or librosa reads;
* and/or packed HDF5 files of the original PANNs code (datasets `audio_name`
  S20, `waveform` int16 [N, 320000], `target` bool [N, 527]; attribute
  `sample_rate`): hdf5s/waveforms/balanced_train.h5, hdf5s/waveforms/eval.h5,
  hdf5s/waveforms/unbalanced_train/unbalanced_train_part00.h5 ... part40.h5
  (generally hdf5s/waveforms/<split>.h5 or hdf5s/waveforms/<split>/*.h5).
  A split with packs is read from the packs only.

Splits whose csv and packs are both absent are not generated. AudioSet
downloads usually miss a share of the videos: every missing clip counts
against max_bad_fraction (default 0.05), raise it for such downloads, e.g.
tfds.builder('audioset', max_bad_fraction=0.3).
"""

# <id>_<start>[_<end>] with optional 'Y' in front, as e.g. audiosetdl writes.
_SEGMENT_STEM = re.compile(r"^([A-Za-z0-9_-]{11})_\d+(?:\.\d+)?(?:_\d+(?:\.\d+)?)?$")


@dataclasses.dataclass
class AudiosetConfig(common.AudioConfig):
    clip_seconds: float = 10.0


class AudioLookup:
    """Finds the audio file of a YouTube id below a folder."""

    def __init__(self, root: str):
        self._files = common.index_audio_files(root, exclude_dirs=("hdf5s",))
        self._segments: Dict[str, List[str]] = {}
        for stem, paths in self._files.items():
            for cand in ([stem[1:]] if stem.startswith("Y") else []) + [stem]:
                m = _SEGMENT_STEM.match(cand)
                if m:
                    self._segments.setdefault(m.group(1), []).extend(paths)

    def __call__(self, ytid: str, split: str) -> Optional[str]:
        paths = self._files.get("Y" + ytid) or self._files.get(ytid) or self._segments.get(ytid)
        if not paths:
            return None
        # The same id in several folders: prefer the one named after the split.
        for p in paths:
            if any(part.startswith(split) for part in p.split(os.sep)[:-1]):
                return p
        return paths[0]


def read_segments_csv(path: str) -> Iterator[List[str]]:
    """Rows of an AudioSet segments csv, '#' comment lines skipped."""
    with open(path, newline="", encoding="utf-8") as f:
        lines = (l for l in f if l.strip() and not l.lstrip().startswith("#"))
        yield from csv.reader(lines, skipinitialspace=True)


def find_packs(manual_dir: str, split: str) -> List[str]:
    """The HDF5 packs of a split: `<split>.h5`, else `<split>/*.h5`, below `PACK_DIR`."""
    base = os.path.join(manual_dir, PACK_DIR)
    single = os.path.join(base, f"{split}.h5")
    if os.path.isfile(single):
        return [single]
    return sorted(glob.glob(os.path.join(base, split, "*.h5")))


class Audioset(common.PannsBuilder):
    """AudioSet balanced/unbalanced train and eval segments (local files)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = common.rate_configs(AudiosetConfig)
    MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL

    def _info_kwargs(self):
        return self._tagging_info(
            [mid for mid, _ in audioset_classes()],
            homepage="https://research.google.com/audioset/",
            citation="Gemmeke et al., Audio Set, ICASSP 2017; Kong et al., PANNs, "
            "IEEE/ACM TASLP 2020.",
        )

    def _split_generators(self, dl_manager):
        manual = os.fspath(dl_manager.manual_dir)
        lookup = None
        generators = {}
        for split, csv_name in SPLIT_CSVS.items():
            packs = find_packs(manual, split)
            csv_path = os.path.join(manual, csv_name)
            if packs:
                generators[split] = self._generate_examples(split, self._pack_candidates(packs))
            elif os.path.isfile(csv_path):
                lookup = lookup or AudioLookup(manual)
                generators[split] = self._generate_examples(
                    split, self._csv_candidates(csv_path, split, lookup)
                )
        if not generators:
            raise FileNotFoundError(f"No AudioSet csv or HDF5 pack found in {manual}.\n{_MANUAL}")
        return generators

    def _csv_candidates(
        self, csv_path: str, split: str, lookup: AudioLookup
    ) -> Iterator[common.Candidate]:
        mid_to_index = {mid: i for i, (mid, _) in enumerate(audioset_classes())}
        sr, length = self.sample_rate, self.clip_samples
        for row_number, row in enumerate(read_segments_csv(csv_path)):
            name = row[0] if row else f"row {row_number}"

            def make(row=row):
                if len(row) < 4:
                    raise common.BadExample(f"malformed csv row: {row!r}")
                ytid, mids = row[0], [m.strip() for m in row[3].split(",") if m.strip()]
                unknown = [m for m in mids if m not in mid_to_index]
                if unknown or not mids:
                    raise common.BadExample(f"unknown label: {unknown or 'none'}")
                path = lookup(ytid, split)
                if path is None:
                    raise common.BadExample(f"missing: no audio file for {ytid}")
                return {
                    "audio": audio_io.load_int16(path, sr, length),
                    "labels": sorted({mid_to_index[m] for m in mids}),
                    "audio_id": ytid,
                }

            yield name, make

    def _pack_candidates(self, packs: List[str]) -> Iterator[common.Candidate]:
        import h5py  # pylint: disable=g-import-not-at-top

        sr, length = self.sample_rate, self.clip_samples
        num_classes = len(audioset_classes())
        for pack in packs:
            with h5py.File(pack, "r") as f:
                if f["target"].shape[1] != num_classes:
                    raise ValueError(
                        f"{pack}: target has {f['target'].shape[1]} classes, expected {num_classes}"
                    )
                pack_rate = int(f.attrs.get("sample_rate", 32000))
                for i in range(f["waveform"].shape[0]):
                    # Read here (files close when the loop ends); decode in workers.
                    name = f["audio_name"][i].decode("utf-8", "replace").strip("\x00")
                    label = f"{os.path.basename(pack)}[{i}] {name}"
                    wave, target = f["waveform"][i], f["target"][i]

                    def make(name=name, wave=wave, target=target, pack_rate=pack_rate):
                        if not name:  # Clip was missing at packing time (fill value row).
                            raise common.BadExample("missing: empty row in pack")
                        audio = wave.astype(np.int16)
                        if pack_rate != sr:
                            audio = audio_io.float_to_int16(
                                audio_io.resample(audio.astype(np.float32) / 32768.0, pack_rate, sr)
                            )
                        ytid = name[1:] if name.startswith("Y") else name
                        return {
                            "audio": audio_io.pad_or_truncate(audio, length),
                            "labels": np.flatnonzero(target).tolist(),
                            "audio_id": os.path.splitext(ytid)[0],
                        }

                    yield label, make
