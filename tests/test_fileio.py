"""panns_jax.fileio.staged: a file is written whole or not at all (the package's one staged
write), with the umask's mode."""

import contextlib
import os
import stat
import tempfile
from typing import Callable, ContextManager, Iterator

import pytest

from panns_jax.fileio import staged


class Interrupted(Exception):
    pass


def interrupted_write(target: Callable[[str], ContextManager[str]], path: str) -> None:
    """Half-write new contents through ``target`` and fail, as a kill or a full disk would."""
    with pytest.raises(Interrupted):
        with target(path) as name, open(name, "w") as f:
            f.write("new, but only half")
            f.flush()
            raise Interrupted


def assert_untouched(directory: str, path: str) -> None:
    assert sorted(os.listdir(directory)) == [os.path.basename(path)]
    with open(path) as f:
        assert f.read() == "old"


@contextlib.contextmanager
def in_place(path: str) -> Iterator[str]:
    """The unsafe way: write straight onto ``path``."""
    yield path


def test_success_renames_onto_the_path(tmp_path):
    path = str(tmp_path / "scores.csv")
    with open(path, "w") as f:
        f.write("old")
    with staged(path) as name:
        assert os.path.dirname(name) == str(tmp_path)
        assert os.path.basename(name).startswith(".scores.csv.")
        assert name.endswith(".part")
        assert not os.path.exists(name)
        with open(name, "w") as f:
            f.write("new")
        with open(path) as f:
            assert f.read() == "old"  # Not replaced until the block ends.
    assert os.listdir(tmp_path) == ["scores.csv"]
    with open(path) as f:
        assert f.read() == "new"


def test_two_stagings_of_one_path_do_not_collide(tmp_path):
    path = str(tmp_path / "a.bin")
    with staged(path) as first, staged(path) as second:
        assert first != second
        for name in (first, second):
            with open(name, "w") as f:
                f.write(name)
    with open(path) as f:
        assert f.read() == first  # The first to finish is renamed last.
    assert os.listdir(tmp_path) == ["a.bin"]


def test_an_exception_leaves_the_old_file_and_no_staging(tmp_path):
    path = str(tmp_path / "model.pth")
    with open(path, "w") as f:
        f.write("old")
    interrupted_write(staged, path)
    assert_untouched(str(tmp_path), path)


def test_an_exception_before_anything_is_written_propagates(tmp_path):
    path = str(tmp_path / "model.pth")
    with pytest.raises(Interrupted):
        with staged(path):
            raise Interrupted
    assert os.listdir(tmp_path) == []


def test_a_staged_directory_is_removed_whole_on_an_exception(tmp_path):
    path = str(tmp_path / "saved_model")
    with pytest.raises(Interrupted):
        with staged(path) as name:
            os.makedirs(os.path.join(name, "variables"))
            with open(os.path.join(name, "variables", "data"), "w") as f:
                f.write("half")
            raise Interrupted
    assert os.listdir(tmp_path) == []
    with staged(path) as name:  # And renamed into place on success.
        os.makedirs(os.path.join(name, "variables"))
    assert os.listdir(tmp_path) == ["saved_model"]
    assert os.listdir(tmp_path / "saved_model") == ["variables"]


def test_negative_control_writing_in_place_is_caught(tmp_path):
    path = str(tmp_path / "model.pth")
    with open(path, "w") as f:
        f.write("old")
    interrupted_write(in_place, path)
    with pytest.raises(AssertionError):
        assert_untouched(str(tmp_path), path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_file_gets_the_umask_mode(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with staged(str(tmp_path / "out.json")) as name, open(name, "w") as f:
            f.write("{}")
        with open(tmp_path / "plain.json", "w") as f:
            f.write("{}")
        fd, mkstemp_name = tempfile.mkstemp(dir=tmp_path)
        os.close(fd)
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "out.json").st_mode)
    assert mode == 0o666 & ~umask
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.json").st_mode)
    if umask == 0o022:  # Negative control: mkstemp's private mode would fail the check.
        assert stat.S_IMODE(os.stat(mkstemp_name).st_mode) != 0o666 & ~umask
