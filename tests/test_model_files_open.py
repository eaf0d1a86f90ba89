"""Opening model files: the opened descriptor is checked, not the name (no TOCTOU escape).

``resolve_model_path`` checks a path while the request is validated;
``open_model`` runs later on the device thread, and whatever happened to the
path in between (a link or a folder swapped by a member of group hailo),
the file it hands HailoRT must be a regular file inside ``model_dirs``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from hailo_devmgr.daemon import model_files
from hailo_devmgr.daemon.handlers import HANDLERS
from hailo_devmgr.daemon.model_files import AllowedPath, ModelFiles, open_model, resolve_model_path
from hailo_devmgr.wire.protocol import FORBIDDEN, LOAD_FAILED, MODEL_NOT_FOUND, RequestError



def own_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def tree(tmp_path):
    """models/ (allowed) with a file and a subfolder; outside/ with a secret."""
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "ok.hef").write_text("inside")
    (models / "sub" / "x.hef").write_text("inside, in a subfolder")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "ok.hef").write_text("SECRET")
    (outside / "x.hef").write_text("SECRET")
    return tmp_path, (str(models),)


def read_via(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def refused(call) -> RequestError:
    before = own_fds()
    with pytest.raises(RequestError) as info:
        call()
    assert own_fds() == before, "a refused open left a descriptor behind"
    return info.value


def test_resolve_returns_the_real_path_with_its_folders(tree):
    root, dirs = tree
    allowed = resolve_model_path(f"{root}/models/../models/ok.hef", dirs)
    assert isinstance(allowed, AllowedPath) and allowed == f"{root}/models/ok.hef"
    assert allowed.model_dirs == dirs


def test_open_hands_hailort_a_proc_fd_path_to_the_same_file(tree):
    root, dirs = tree
    before = own_fds()
    with open_model(resolve_model_path(f"{root}/models/ok.hef", dirs)) as opened:
        assert opened.path == f"/proc/self/fd/{opened.fd}"
        assert opened.real_path == f"{root}/models/ok.hef"
        assert read_via(opened.path) == "inside"
        assert os.get_inheritable(opened.fd) is False  # O_CLOEXEC
    assert opened.closed and own_fds() == before
    opened.close()  # twice is fine


def test_a_file_swapped_for_a_link_after_the_check_is_refused(tree):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/ok.hef", dirs)
    os.unlink(checked)
    os.symlink(f"{root}/outside/ok.hef", checked)
    error = refused(lambda: open_model(checked))
    assert error.code == FORBIDDEN and "outside the allowed model folders" in error.message


def test_a_folder_swapped_for_a_link_after_the_check_is_refused(tree):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/sub/x.hef", dirs)
    os.rename(f"{root}/models/sub", f"{root}/models/sub.old")
    os.symlink(f"{root}/outside", f"{root}/models/sub")
    assert refused(lambda: open_model(checked)).code == FORBIDDEN


def swap_during_open(monkeypatch, swap):
    """Run ``swap()`` between open_model's name check and its open: the narrowest race."""
    real_realpath = os.path.realpath

    def realpath_then_swap(path, *args, **kwargs):
        result = real_realpath(path, *args, **kwargs)
        if path.endswith(".hef"):
            swap()
        return result
    monkeypatch.setattr(model_files.os.path, "realpath", realpath_then_swap)


def test_a_folder_swapped_between_name_check_and_open_is_caught_on_the_descriptor(tree, monkeypatch):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/sub/x.hef", dirs)

    def swap():
        os.rename(f"{root}/models/sub", f"{root}/models/sub.old")
        os.symlink(f"{root}/outside", f"{root}/models/sub")
    swap_during_open(monkeypatch, swap)
    # The name check passed (it ran before the swap); the descriptor's location did not.
    error = refused(lambda: open_model(checked))
    assert error.code == FORBIDDEN and error.message.startswith(f"Model path {checked} is outside")


def test_a_last_component_swapped_between_name_check_and_open_is_not_followed(tree, monkeypatch):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/ok.hef", dirs)

    def swap():
        os.unlink(checked)
        os.symlink(f"{root}/outside/ok.hef", checked)
    swap_during_open(monkeypatch, swap)
    assert refused(lambda: open_model(checked)).code == MODEL_NOT_FOUND  # the link itself is no file


def test_a_fifo_swapped_in_neither_blocks_nor_opens(tree, monkeypatch):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/ok.hef", dirs)

    def swap():
        os.unlink(checked)
        os.mkfifo(checked)
    swap_during_open(monkeypatch, swap)
    error = refused(lambda: open_model(checked))  # O_PATH: no reader waits for a writer
    assert error.code == MODEL_NOT_FOUND and error.message == f"Model file not found: {checked}"


def test_a_file_removed_after_the_check_is_not_found_under_the_clients_name(tree):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/ok.hef", dirs)
    os.unlink(checked)
    error = refused(lambda: open_model(checked, shown="/as/the/client/wrote/it.hef"))
    assert (error.code, error.message) == (MODEL_NOT_FOUND, "Model file not found: /as/the/client/wrote/it.hef")


def test_model_dirs_changed_by_a_reload_do_not_widen_an_old_check(tree):
    root, dirs = tree
    checked = resolve_model_path(f"{root}/models/ok.hef", dirs)
    # Checked against these folders: opening uses them, not whatever is configured now.
    with open_model(checked) as opened:
        assert opened.real_path == checked
    assert refused(lambda: open_model(checked, (f"{root}/outside",))).code == FORBIDDEN


def test_a_plain_path_without_folders_is_refused(tree):
    root, _ = tree
    assert refused(lambda: open_model(f"{root}/models/ok.hef")).code == FORBIDDEN


def test_directories_and_devices_are_not_model_files(tree):
    root, dirs = tree
    assert refused(lambda: open_model(f"{root}/models/sub", dirs)).code == MODEL_NOT_FOUND
    assert refused(lambda: open_model("/dev/null", ("/dev",))).code == MODEL_NOT_FOUND


def test_model_files_group_opens_every_param_path_through_check_params(tree):
    root, dirs = tree
    shutil.copy(f"{root}/models/ok.hef", f"{root}/models/text.hef")
    clip = HANDLERS["clip"]
    checked = clip.check_params({"text_hef_path": f"{root}/models/text.hef"},
                                lambda path, key: resolve_model_path(path, dirs, f"model_params.{key}"))
    before = own_fds()
    files = ModelFiles()
    main = files.open(resolve_model_path(f"{root}/models/ok.hef", dirs), shown="/client/ok.hef")
    opened = clip.check_params(checked, files.open)
    assert opened["text_hef_path"].startswith("/proc/self/fd/") and read_via(opened["text_hef_path"]) == "inside"
    assert len(own_fds() - before) == 2
    # Messages name real files, never descriptors.
    assert files.shown(f"bad HEF {main} and {opened['text_hef_path']}") == (
        f"bad HEF {root}/models/ok.hef and {root}/models/text.hef")
    assert files.shown("/proc/self/fd/99999 stays") == "/proc/self/fd/99999 stays"
    files.close()
    assert own_fds() == before


def test_ocr_recognition_hefs_are_opened_too_and_all_closed_when_one_fails(tree):
    root, dirs = tree
    ocr = HANDLERS["ocr"]
    resolve = lambda path, key: resolve_model_path(path, dirs, f"model_params.{key}")  # noqa: E731
    checked = ocr.check_params({"recognition_hefs": {"en": f"{root}/models/ok.hef",
                                                     "zh": f"{root}/models/sub/x.hef"}}, resolve)
    os.unlink(f"{root}/models/sub/x.hef")  # gone before the load
    before = own_fds()
    files = ModelFiles()
    with pytest.raises(RequestError) as info:
        ocr.check_params(checked, files.open)
    assert info.value.code == MODEL_NOT_FOUND
    files.close()
    assert own_fds() == before


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_an_unreadable_file_is_load_failed_with_the_hailort_name_and_hint(readable_src):
    folder = tempfile.mkdtemp(prefix="hailo-devmgr-unreadable-")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "locked.hef")
        with open(path, "w") as handle:
            handle.write("x")
        os.chmod(path, 0o600)  # root's; the checking user cannot read it
        script = (
            "import os, sys; os.setgid(65534); os.setgroups([]); os.setuid(65534); sys.path.insert(0, sys.argv[2])\n"
            "from hailo_devmgr.daemon.model_files import open_model\n"
            "from hailo_devmgr.wire.protocol import RequestError\n"
            "before = len(os.listdir('/proc/self/fd'))\n"
            "try: open_model(sys.argv[1], (os.path.dirname(sys.argv[1]),))\n"
            "except RequestError as e: print(e.code); print(e.message)\n"
            "print(len(os.listdir('/proc/self/fd')) == before)\n")
        out = subprocess.run([sys.executable, "-c", script, path, readable_src], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        code, message, no_leak = out.stdout.splitlines()
        assert code == LOAD_FAILED and no_leak == "True"
        assert message.startswith(f"Failed to load model: cannot open {path}: Permission denied")
        assert "HAILO_OPEN_FILE_FAILURE" in message and "readable by group hailo" in message
    finally:
        shutil.rmtree(folder, ignore_errors=True)
