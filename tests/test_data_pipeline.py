"""Tests of the tf.data training / evaluation pipeline (panns_jax.data.pipeline)."""

import collections
import subprocess
import sys

import numpy as np
import pytest

from panns_jax.data import panns_demo, pipeline, sampling, sources

C = 5
SIZES = [1000, 300, 100, 30, 10]  # 100x imbalance


def _audio_for(record, length):
    """Clip whose samples encode (record, position): crops are checkable."""
    return ((record * 7919 + np.arange(length)) % 30000).astype(np.int16)


@pytest.fixture(scope="module")
def skewed():
    """Single-label source, class sizes differ 100x, varying clip lengths."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(SIZES)])
    order = np.random.default_rng(0).permutation(len(labels))
    labels = labels[order]
    lengths = 300 + (np.arange(len(labels)) % 3) * 150  # 300, 450, 600
    audio = [_audio_for(i, n) for i, n in enumerate(lengths)]
    return sources.ArraySource(audio, labels, num_classes=C), labels


def _take(it, n):
    return [next(it) for _ in range(n)]


def _iterator(source, **kw):
    args = dict(
        batch_size=20, clip_samples=400, seed=0, process_index=0, process_count=1, with_record=True
    )
    args.update(kw)
    return pipeline.make_train_iterator(source, **args)


def test_balanced_class_frequencies_are_uniform(skewed):
    source, labels = skewed
    it = _iterator(source, batch_size=50)
    batches = _take(it, 100)  # 5000 draws = 1000 permutations of the 5 classes
    drawn = np.concatenate([b["record"] for b in batches])
    classes = labels[drawn]
    counts = np.bincount(classes, minlength=C)
    # Exact: each aligned window of C draws is a permutation of all classes.
    assert counts.tolist() == [1000] * C
    for w in classes.reshape(-1, C):
        assert sorted(w) == list(range(C))
    # Windows are not all in the same order (the permutations are fresh).
    assert len({tuple(w) for w in classes.reshape(-1, C)}) > 50
    # Within a class: each pass over its n examples visits each once, then
    # reshuffles. Class 4 (10 examples) has 1000 draws = 100 passes.
    rare = drawn[classes == 4].reshape(100, 10)
    members = np.flatnonzero(labels == 4)
    for p in rare:
        assert sorted(p) == sorted(members)
    assert len({tuple(p) for p in rare}) > 90
    # Labels are the multi-hot of the drawn records.
    np.testing.assert_array_equal(
        batches[0]["labels"], np.eye(C, dtype=np.float32)[labels[batches[0]["record"]]]
    )


def test_balanced_frequencies_random_positions_within_bound(skewed):
    """Over windows not aligned to permutations, counts stay within +-1 / class."""
    source, labels = skewed
    it = _iterator(source, batch_size=7, seed=5)
    drawn = np.concatenate([b["record"] for b in _take(it, 143)])  # 1001 draws
    counts = np.bincount(labels[drawn], minlength=C)
    assert np.abs(counts - len(drawn) / C).max() <= 1


def test_multilabel_clips_are_in_each_class_stream():
    # Clip 0 is the only example of class 2 and also belongs to class 0.
    labels = [[0, 2], [0], [0], [0], [1], [1]]
    audio = np.zeros((6, 100), np.int16)
    source = sources.ArraySource(audio, labels, num_classes=3)
    it = _iterator(source, batch_size=3, clip_samples=100)
    batches = _take(it, 40)  # 120 draws = 40 permutations of the 3 classes
    drawn = np.concatenate([b["record"] for b in batches])
    # Class 2's stream is clip 0 alone, and class 0's stream also holds it.
    assert (drawn == 0).sum() > 40
    assert set(drawn.tolist()) == set(range(6))
    rows = np.concatenate([b["labels"] for b in batches])[drawn == 0]
    assert (rows == [1.0, 0.0, 1.0]).all()


def test_uniform_mode_is_an_epoch_permutation(skewed):
    source, _ = skewed
    n = source.num_examples
    it = _iterator(source, batch_size=40, balanced=False)
    drawn = np.concatenate([b["record"] for b in _take(it, 2 * n // 40)])
    assert sorted(drawn[:n]) == list(range(n))
    assert sorted(drawn[n:]) == list(range(n))
    assert not np.array_equal(drawn[:n], drawn[n:])


def test_same_seed_same_stream_different_seed_different(skewed):
    source, _ = skewed
    a = _take(_iterator(source, seed=1), 5)
    b = _take(_iterator(source, seed=1), 5)
    c = _take(_iterator(source, seed=2), 5)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not all(np.array_equal(x["record"], y["record"]) for x, y in zip(a, c))


@pytest.mark.parametrize("balanced", [True, False])
def test_resume_continues_the_stream(skewed, tmp_path, balanced):
    source, _ = skewed
    full = _take(_iterator(source, seed=3, balanced=balanced), 9)
    first = _iterator(source, seed=3, balanced=balanced)
    _take(first, 4)
    state = first.get_state()
    assert state["step"] == 4
    first.save(str(tmp_path / "it.json"))
    resumed = _iterator(source, seed=3, balanced=balanced)
    resumed.restore(str(tmp_path / "it.json"))
    rest = _take(resumed, 5)
    for x, y in zip(full[4:], rest):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # set_state on an iterator that already ran also rewinds/advances it.
    first.set_state({**state, "step": 7})
    np.testing.assert_array_equal(next(first)["audio"], full[7]["audio"])
    with pytest.raises(ValueError, match="another pipeline"):
        _iterator(source, seed=4, balanced=balanced).set_state(state)


def test_crop_and_pad(skewed):
    source, _ = skewed
    it = _iterator(source, clip_samples=400, balanced=False)
    offsets = collections.Counter()
    for batch in _take(it, 30):
        assert batch["audio"].dtype == np.float32 and batch["audio"].shape == (20, 400)
        for rec, audio in zip(batch["record"], batch["audio"]):
            src = _audio_for(rec, 300 + (rec % 3) * 150).astype(np.float32) / 32768
            if len(src) < 400:  # Zero-padded at the end.
                np.testing.assert_array_equal(audio[: len(src)], src)
                assert not audio[len(src) :].any()
            else:  # A window of the source.
                off = int(round(audio[0] * 32768 - src[0] * 32768)) % 30000
                np.testing.assert_array_equal(audio, src[off : off + 400])
                offsets[(len(src), off)] += 1
    # Long clips are cropped at offsets spread over the whole valid range.
    long_offsets = {o for (n, o) in offsets if n == 600}
    assert len(long_offsets) > 20 and max(long_offsets) <= 200
    assert max(o for (n, o) in offsets if n == 450) <= 50


@pytest.mark.parametrize("balanced", [True, False])
def test_hosts_read_disjoint_rows_of_the_same_global_batch(skewed, balanced):
    """The global batch at each step does not depend on the number of hosts:
    host h reads rows h*b .. h*b+b-1 of what one host reads, nothing else."""
    source, _ = skewed

    def steps(process_index, process_count, start=0):
        it = pipeline.make_train_iterator(
            source,
            batch_size=30,
            clip_samples=400,
            seed=0,
            balanced=balanced,
            process_index=process_index,
            process_count=process_count,
            with_record=True,
        )
        it.set_state({**it.get_state(), "step": start})
        batches = _take(it, 20)
        it.close()
        return it, batches

    _, single = steps(0, 1)
    for count in (2, 3):
        hosts = [steps(h, count) for h in range(count)]
        for h, (it, _) in enumerate(hosts):
            assert it.batch_size == 30 // count and it.row_offset == h * 30 // count
            assert len(it.records) == source.num_examples  # Every host samples from all.
        for step in range(20):
            for key in ("record", "audio", "labels"):
                np.testing.assert_array_equal(
                    np.concatenate([b[step][key] for _, b in hosts]), single[step][key]
                )
        # Resuming at step 7 on 3 hosts continues the 1-host run's data order.
        if count == 3:
            resumed = np.concatenate([steps(h, 3, start=7)[1][0]["record"] for h in range(3)])
            np.testing.assert_array_equal(resumed, single[7]["record"])
    # The iterator state names no host: one host's state restores on 3 hosts.
    state = steps(0, 1)[0].get_state()
    pipeline.make_train_iterator(
        source,
        batch_size=30,
        clip_samples=400,
        seed=0,
        balanced=balanced,
        process_index=2,
        process_count=3,
    ).set_state(state)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(
            source, batch_size=31, clip_samples=100, process_index=0, process_count=3
        )


def test_eval_covers_every_example_once_in_order(skewed):
    source, labels = skewed
    n = source.num_examples
    ev = pipeline.make_eval_iterator(
        source, batch_size=64, clip_samples=500, process_index=0, process_count=1, with_record=True
    )
    batches = list(ev)
    assert len(batches) == len(ev) == -(-n // 64)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == bool and mask.sum() == n and mask[:n].all()
    records = np.concatenate([b["record"] for b in batches])[mask]
    np.testing.assert_array_equal(records, np.arange(n))
    audio = np.concatenate([b["audio"] for b in batches])
    labels_out = np.concatenate([b["labels"] for b in batches])
    for r in [0, 1, 2, n - 1]:
        src = _audio_for(r, 300 + (r % 3) * 150).astype(np.float32) / 32768
        want = np.pad(src, (0, max(0, 500 - len(src))))[:500]  # first samples kept
        np.testing.assert_array_equal(audio[r], want)
        assert labels_out[r].argmax() == labels[r] and labels_out[r].sum() == 1
    assert not audio[n:].any() and not labels_out[n:].any()
    assert len(list(ev)) == len(batches)  # Re-iterable.


def test_eval_multi_host_shards(skewed):
    source, _ = skewed
    n = source.num_examples
    got, num_batches = [], set()
    for host in range(4):
        ev = pipeline.make_eval_iterator(
            source,
            batch_size=128,
            clip_samples=50,
            process_index=host,
            process_count=4,
            with_record=True,
        )
        batches = list(ev)
        num_batches.add(len(batches))
        for b in batches:
            assert b["audio"].shape == (32, 50)
            got += b["record"][b["mask"]].tolist()
    assert len(num_batches) == 1
    assert sorted(got) == list(range(n))


def test_eval_segments_read_each_recording_whole_in_windows_of_the_clip_length(skewed):
    source, labels = skewed
    n, clip = source.num_examples, 200
    lengths = 300 + (np.arange(n) % 3) * 150  # 300, 450, 600 samples: 2, 3, 3 segments.
    ev = pipeline.make_eval_iterator(
        source, batch_size=64, clip_samples=clip, process_index=0, process_count=1, segments=True
    )
    batches = list(ev)
    mask = np.concatenate([b["mask"] for b in batches])
    records = np.concatenate([b["record"] for b in batches])[mask]
    audio = np.concatenate([b["audio"] for b in batches])[mask]
    counts = -(-lengths // clip)
    np.testing.assert_array_equal(records, np.repeat(np.arange(n), counts))
    assert ev.num_examples == n and mask.sum() == counts.sum()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for r in [0, 1, 2, n - 1]:
        src = _audio_for(r, lengths[r]).astype(np.float32) / 32768
        windows = audio[starts[r] : starts[r] + counts[r]]
        for k, window in enumerate(windows):
            begin = min(k * clip, lengths[r] - clip)  # The last window ends at the end.
            np.testing.assert_array_equal(window, src[begin : begin + clip])
        if lengths[r] % clip:  # Negative control: a zero-padded last window differs.
            padded = np.pad(src[(counts[r] - 1) * clip :], (0, counts[r] * clip - lengths[r]))
            assert not np.array_equal(windows[-1], padded)
    # Every host gets whole recordings and as many batches as the others.
    got, sizes = [], set()
    for host in range(3):
        ev = pipeline.make_eval_iterator(
            source,
            batch_size=48,
            clip_samples=clip,
            process_index=host,
            process_count=3,
            segments=True,
        )
        sizes.add(len(ev))
        got.append(np.concatenate([b["record"][b["mask"]] for b in ev]))
    assert len(sizes) == 1
    np.testing.assert_array_equal(np.concatenate(got), np.repeat(np.arange(n), counts))
    assert not set(got[0]) & set(got[1])


def test_clips_per_class_trains_on_exactly_n_seeded_clips_of_each_class():
    labels = np.arange(60) % 3
    labels[:12] = 0  # Classes of 28, 16 and 16 clips.
    audio = [np.full(100, i, np.int16) for i in range(60)]
    source = sources.ArraySource(audio, labels, num_classes=3)

    def chosen(seed, n=5):
        return sampling.per_class(np.arange(60), source.index, n, seed)

    first = chosen(0)
    assert np.bincount(labels[first], minlength=3).tolist() == [5, 5, 5]
    assert (np.diff(first) > 0).all()
    np.testing.assert_array_equal(chosen(0), first)
    assert not np.array_equal(chosen(1), first)
    it = pipeline.make_train_iterator(
        source,
        batch_size=6,
        clip_samples=100,
        balanced=False,
        seed=0,
        clips_per_class=5,
        with_record=True,
        process_index=0,
        process_count=1,
    )
    drawn = {int(r) for _ in range(20) for r in next(it)["record"]}
    it.close()
    assert drawn == set(first.tolist())
    with pytest.raises(sampling.SelectionError, match="class 'b' has 16 training clips, fewer"):
        sampling.per_class(np.arange(60), source.index, 19, 0, names=["a", "b", "c"])
    multi = sources.ArraySource(audio[:4], [[0], [0, 1], [1], [1]], num_classes=2)
    with pytest.raises(sampling.SelectionError, match="single-label"):
        sampling.per_class(np.arange(4), multi.index, 1, 0)


def test_folds_filter():
    audio = np.zeros((20, 10), np.int16)
    labels = np.arange(20) % 4
    folds = np.arange(20) % 5 + 1
    source = sources.ArraySource(audio, labels, num_classes=4, columns={"fold": folds})
    ev = pipeline.make_eval_iterator(
        source, batch_size=8, folds=[2, 5], process_index=0, process_count=1, with_record=True
    )
    records = np.concatenate([b["record"][b["mask"]] for b in ev])
    np.testing.assert_array_equal(records, np.flatnonzero(np.isin(folds, [2, 5])))
    it = _iterator(source, batch_size=10, clip_samples=10, folds=[1, 2, 3, 4])
    drawn = np.concatenate([b["record"] for b in _take(it, 20)])
    assert set(folds[drawn]) == {1, 2, 3, 4}


def test_tfds_source_end_to_end(tmp_path, monkeypatch):
    """Builder -> ArrayRecord -> pipeline: batches hold the stored samples."""
    config = panns_demo.PannsDemoConfig(
        name="tiny", clip_seconds=0.25, num_train=30, num_eval=7, seed=1
    )
    builder = panns_demo.PannsDemo(data_dir=str(tmp_path), config=config)
    builder.download_and_prepare()
    stored = builder.as_data_source("train")
    it = pipeline.make_train_iterator(
        builder,
        "train",
        batch_size=8,
        clip_samples=8000,
        seed=0,
        process_index=0,
        process_count=1,
        with_record=True,
    )
    assert isinstance(it.source, sources.TfdsSource)
    for batch in _take(it, 6):
        for rec, audio, lab in zip(batch["record"], batch["audio"], batch["labels"]):
            ex = stored[int(rec)]
            np.testing.assert_array_equal(audio, ex["audio"].astype(np.float32) / 32768)
            assert np.flatnonzero(lab).tolist() == sorted(ex["labels"])
    ev = pipeline.make_eval_iterator(
        builder, "eval", batch_size=4, process_index=0, process_count=1
    )
    batches = list(ev)
    assert [b["mask"].sum() for b in batches] == [4, 3]
    ev_src = builder.as_data_source("eval")
    np.testing.assert_array_equal(
        batches[1]["audio"][2], ev_src[6]["audio"].astype(np.float32) / 32768
    )
    assert batches[0]["labels"].shape == (4, 10)
    # A file the pread reader refuses is read by array_record's reader: the same examples.
    from panns_jax.data import records

    expected = it.source.read(np.arange(30))

    class Refused(records.ArrayRecordFile):
        def __init__(self, path):
            self._fd = -1
            raise ValueError("refused")

    monkeypatch.setattr(records, "ArrayRecordFile", Refused)
    fallback = sources.TfdsSource(builder, "train")
    for (a, la), (b, lb) in zip(fallback.read(np.arange(30)), expected):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert type(fallback._reader(0)).__name__ == "ArrayRecordReader"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000])
def test_permute_is_a_keyed_bijection(n):
    perms = [sampling.permute(np.arange(n), n, key) for key in range(5)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(n))
    if n >= 7:
        assert len({tuple(p) for p in perms}) == 5
    # Vectorised over keys and sizes at once.
    keys = np.array([3, 4])
    both = sampling.permute(np.array([0, 0]), np.array([n, n]), keys)
    assert both.tolist() == [perms[3][0], perms[4][0]]


def test_tfrecord_datasets_fall_back_to_memory(tmp_path):
    config = panns_demo.PannsDemoConfig(
        name="tiny", clip_seconds=0.1, num_train=12, num_eval=3, seed=2
    )
    builder = panns_demo.PannsDemo(data_dir=str(tmp_path), config=config, file_format="tfrecord")
    builder.download_and_prepare()
    source = sources.make_source(builder, "train")
    assert isinstance(source, sources.ArraySource) and source.num_examples == 12
    ev = pipeline.make_eval_iterator(
        source, batch_size=4, process_index=0, process_count=1, with_record=True
    )
    first = next(iter(ev))
    ref = panns_demo.synthesize_clip(2, 0, 0, 32000, 3200)
    np.testing.assert_array_equal(
        first["audio"][0] * 32768, np.round(ref["audio"].astype(np.float64) * 32768)
    )
    assert np.flatnonzero(first["labels"][0]).tolist() == sorted(ref["labels"])


def test_demo_by_name_prepares_itself_and_uses_jax_process(panns_demo_dir):
    it = pipeline.make_train_iterator(
        "panns_demo", "train", batch_size=8, clip_samples=32000, data_dir=str(panns_demo_dir)
    )
    batch = next(it)
    assert batch["audio"].shape == (8, 32000) and batch["labels"].shape == (8, 10)
    assert it.source.num_examples == 400 and len(it.records) == 400  # 1 process
    ev = pipeline.make_eval_iterator("panns_demo", batch_size=32, data_dir=str(panns_demo_dir))
    assert len(ev) == 4 and ev.clip_samples == 64000


def test_fraction_trains_on_a_fixed_seeded_subset():
    audio = [np.full(1000, i, np.int16) for i in range(40)]
    labels = [np.array([i % 4], np.int32) for i in range(40)]
    source = sources.ArraySource(audio, labels, num_classes=4)

    def seen(seed):
        it = pipeline.make_train_iterator(
            source,
            batch_size=8,
            clip_samples=1000,
            balanced=False,
            seed=seed,
            fraction=0.25,
            with_record=True,
            process_index=0,
            process_count=1,
        )
        records = {int(r) for _ in range(20) for r in next(it)["record"]}
        it.close()
        return records

    first = seen(0)
    assert len(first) == 10  # A quarter of 40 examples, all of them visited in 160 draws.
    assert seen(0) == first and seen(1) != first
    with pytest.raises(ValueError, match="fraction"):
        pipeline.make_train_iterator(
            source, batch_size=8, clip_samples=1000, fraction=0.0, process_index=0, process_count=1
        )


_REUSE_PROBE = """
import ctypes, resource, sys
from panns_jax import malloc
if sys.argv[1] == 'tuned':
  assert malloc.tune_malloc()
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 2**31 + 2**28  # above any finite mmap threshold mallopt accepts (an int)

def touch_and_free():  # plain malloc: numpy would ask for huge pages itself
  buffer = libc.malloc(size)
  ctypes.memset(buffer, 1, size)
  libc.free(buffer)

touch_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch_and_free()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (size / 4096))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tune_malloc_reuses_freed_multi_gigabyte_buffers():
    """XLA's step buffers (9 GB for the paper's batch) must not fault in anew."""

    def faults_per_page(mode):
        out = subprocess.run(
            [sys.executable, "-c", _REUSE_PROBE, mode], check=True, capture_output=True, text=True
        )
        return float(out.stdout.split()[-1])

    assert faults_per_page("default") > 0.5  # the probe sees fresh pages fault
    assert faults_per_page("tuned") < 0.05  # the same buffer, already mapped


def _zipf_index(num_clips=3000, num_classes=527):
    """AudioSet-shaped multi-label index: 1-3 classes per clip, Zipf-skewed classes."""
    from panns_jax.data import common

    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, num_classes + 1)
    weights /= weights.sum()
    labels = []
    for i in range(num_clips):
        first = i if i < num_classes else rng.choice(num_classes, p=weights)
        extra = rng.choice(num_classes, rng.integers(0, 3), p=weights).tolist()
        labels.append(sorted({first, *extra}))
    return common.ExampleIndex(labels, None)


def test_the_stream_is_pinned():
    """The numbers of the balanced and uniform streams and the crop offsets are fixed.

    A checkpoint's iterator state resumes the same data order in any version of the
    package, so the first draws and a digest of 200,000 draws of each stream are pinned.
    """
    import hashlib

    index = _zipf_index()
    records = np.arange(len(index), dtype=np.int64)
    keys = sampling.seed_keys(7)
    k = np.arange(200000, dtype=np.int64)
    streams = {
        "balanced": sampling.BalancedSampler(index, records, 527, keys)(k),
        "uniform": sampling.UniformSampler(len(records), keys)(k),
        "crop": sampling.crop_offsets(sampling.crop_hashes(keys, k), np.full(len(k), 12344)),
    }
    pinned = {
        "balanced": ([410, 474, 1478, 2854, 1497, 1581, 1943, 2669], "02eb6be43bfeb44a"),
        "uniform": ([1064, 1535, 335, 1971, 4, 82, 1794, 834], "43f7daebb76af4d5"),
        "crop": ([8760, 9585, 5223, 4265, 4512, 9220, 10389, 6662], "dcaee4e5fb2037d3"),
    }

    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a, np.int64).tobytes()).hexdigest()[:16]

    for name, stream in streams.items():
        assert (stream[:8].tolist(), digest(stream)) == pinned[name], name
    # Negative control: another seed is another stream.
    other = sampling.BalancedSampler(index, records, 527, sampling.seed_keys(8))(k)
    assert digest(other) != pinned["balanced"][1]


_IMPORT_PROBE = """
import sys
import {module}
print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)
"""


def test_sampling_imports_without_tensorflow():
    """The sampler is numpy only: importing it (and the package) skips TF's ~9 s import."""

    def imports_tf(module):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT_PROBE.format(module=module)],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.split()[-2:]

    assert imports_tf("panns_jax.data.sampling") == ["False", "False"]
    # Negative control: the tf.data iterators do bring TensorFlow in, and the probe sees it.
    assert imports_tf("panns_jax.data.pipeline") == ["True", "True"]


def _write_array_record(path, payloads, options):
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for p in payloads:
        writer.write(p)
    writer.close()


def test_array_record_file_reads_what_array_record_reads(tmp_path):
    """The pread reader returns array_record's bytes, across 64 KiB block boundaries."""
    from array_record.python import array_record_module

    from panns_jax.data import records

    rng = np.random.default_rng(0)
    sizes = [1, 40, 65000, 65512, 65536, 200000, 3, 131072, 7, 700000]
    payloads = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    path = tmp_path / "x.array_record"
    _write_array_record(path, payloads, "group_size:1,uncompressed")
    theirs = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")
    ours = records.ArrayRecordFile(str(path))
    assert len(ours) == theirs.num_records() == len(payloads)
    buffer = bytearray(10)  # Too small: replaced by a larger one.
    for i in rng.permutation(len(payloads)):
        view = ours.read_into(int(i), buffer)
        assert bytes(view) == theirs.read([int(i)])[0] == payloads[i]
        buffer = view.obj
    ours.close()
    # Negative controls: layouts it does not read are refused, by name, not misread.
    for options, why in [("group_size:1", "compressed"), ("group_size:4,uncompressed", "several")]:
        other = tmp_path / f"{why}.array_record"
        _write_array_record(other, payloads, options)
        with pytest.raises(ValueError, match=why):
            records.ArrayRecordFile(str(other))


def test_batch_buffers_are_reused_only_when_no_batch_holds_them(skewed):
    buffers = pipeline._BatchBuffers(keep=2)
    a = buffers.empty((3, 5))
    a[:] = 1
    b = buffers.empty((3, 5))
    assert not np.shares_memory(a, b) and a.ctypes.data % 64 == b.ctypes.data % 64 == 0
    a_storage = a.ctypes.data
    del a
    c = buffers.empty((3, 5))  # a is gone: its storage is reused
    assert c.ctypes.data == a_storage
    part = c[1:]  # A slice alone keeps the storage busy.
    del c
    d = buffers.empty((3, 5))
    assert not np.shares_memory(d, part) and not np.shares_memory(d, b)
    assert len(buffers._storage) == 2  # (keep=2: d is a fresh buffer, not kept)
    del part, b
    e = buffers.empty((3, 5))
    assert any(np.shares_memory(e, s) for s in buffers._storage)
    # End to end: every batch a caller holds keeps its values while later batches are
    # written (more of them than the buffers kept), and they are the pool's (zero copy).
    source, _ = skewed
    it = _iterator(source, batch_size=20)
    held = _take(it, 12)
    slots = it._buffers._storage
    assert sum(any(np.shares_memory(h["audio"], s) for s in slots) for h in held) >= 2
    again = _iterator(source, batch_size=20)
    for step, batch in enumerate(held):
        np.testing.assert_array_equal(batch["audio"], again.batch(step)[0])


def test_every_name_the_package_exports_resolves():
    """panns_jax.data imports its modules on first use: each public name must lead to one."""
    import panns_jax.data as pdata

    assert {"make_train_iterator", "ArraySource", "Audioset", "get_builder"} <= set(pdata.__all__)
    for name in pdata.__all__:
        assert getattr(pdata, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        pdata.no_such_name  # noqa: B018
