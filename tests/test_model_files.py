"""Only files inside model_dirs may be opened, whatever the path says."""
import os

import pytest

from hailo_devmgr.daemon import model_files
from hailo_devmgr.daemon.model_files import NotResolvedLately, resolve_model_path
from hailo_devmgr.wire.protocol import BAD_REQUEST, FORBIDDEN, MODEL_NOT_FOUND, RequestError


@pytest.fixture
def dirs(tmp_path):
    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "ok.hef").write_text("x")
    (allowed / "sub").mkdir()
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.hef").write_text("x")
    os.symlink(outside / "key.hef", allowed / "escape.hef")
    os.symlink(allowed / "ok.hef", tmp_path / "link-in.hef")
    (tmp_path / "models-evil").mkdir()
    (tmp_path / "models-evil" / "x.hef").write_text("x")
    return tmp_path, (str(allowed),)


def _code(path, model_dirs):
    with pytest.raises(RequestError) as info:
        resolve_model_path(path, model_dirs)
    return info.value.code, info.value.message


def test_file_inside_is_accepted_as_its_real_path(dirs):
    root, model_dirs = dirs
    assert resolve_model_path(f"{root}/models/ok.hef", model_dirs) == f"{root}/models/ok.hef"
    # A link from outside that points inside is fine: the real file is allowed.
    assert resolve_model_path(f"{root}/link-in.hef", model_dirs) == f"{root}/models/ok.hef"


@pytest.mark.parametrize("relative", [
    "secret/key.hef",              # plainly outside
    "models/../secret/key.hef",    # .. escape
    "models/escape.hef",           # symlink escape
    "models-evil/x.hef",           # prefix of the folder name is not inside it
    "secret/missing.hef",          # outside and missing: forbidden, not "not found"
])
def test_outside_is_forbidden(dirs, relative):
    root, model_dirs = dirs
    code, message = _code(f"{root}/{relative}", model_dirs)
    assert code == FORBIDDEN and "outside the allowed model folders" in message


def test_missing_and_directory_use_the_v1_not_found_text(dirs):
    root, model_dirs = dirs
    code, message = _code(f"{root}/models/missing.hef", model_dirs)
    assert code == MODEL_NOT_FOUND and message == f"Model file not found: {root}/models/missing.hef"
    code, message = _code(f"{root}/models/sub", model_dirs)
    assert code == MODEL_NOT_FOUND and message.startswith(f"Model file not found: {root}/models/sub")


@pytest.mark.parametrize("path", ["relative.hef", "", "/a\0b", "/" + "a" * 5000])
def test_malformed_paths_are_bad_requests(dirs, path):
    _, model_dirs = dirs
    assert _code(path, model_dirs)[0] == BAD_REQUEST


@pytest.fixture
def trust(monkeypatch):
    """Sets how long a resolved name is taken as it was (RESOLUTION_TRUST_S)."""
    return lambda seconds: monkeypatch.setattr(model_files, "RESOLUTION_TRUST_S", seconds)


def test_a_name_resolved_before_is_resolved_again_once_it_leads_elsewhere(dirs, trust):
    """Names are remembered (one stat instead of realpath per request), but a
    name that now leads to another file, or to none, is checked from scratch
    once its trust has passed."""
    root, model_dirs = dirs
    trust(0)
    link = root / "link-in.hef"
    assert resolve_model_path(str(link), model_dirs) == f"{root}/models/ok.hef"
    link.unlink()
    link.symlink_to(root / "secret" / "key.hef")      # same name, now a file outside
    code, message = _code(str(link), model_dirs)
    assert code == FORBIDDEN and "outside the allowed model folders" in message
    assert resolve_model_path(f"{root}/models/ok.hef", model_dirs) == f"{root}/models/ok.hef"
    os.unlink(f"{root}/models/ok.hef")
    assert _code(f"{root}/models/ok.hef", model_dirs)[0] == MODEL_NOT_FOUND
    # Another allowed folder list is another question.
    (root / "models" / "ok.hef").write_text("x")
    assert _code(f"{root}/models/ok.hef", (str(root / "secret"),))[0] == FORBIDDEN


def test_a_re_pointed_name_means_the_file_it_was_checked_as_while_trusted(dirs, trust):
    """Within RESOLUTION_TRUST_S a name is not looked at again (no system
    call on the event loop): re-pointed outside meanwhile, it still means
    the inside file it was checked as, never the new target; then it is
    checked again and refused."""
    root, model_dirs = dirs
    trust(3600)
    link = root / "link-in.hef"
    assert resolve_model_path(str(link), model_dirs) == f"{root}/models/ok.hef"
    link.unlink()
    link.symlink_to(root / "secret" / "key.hef")
    assert resolve_model_path(str(link), model_dirs) == f"{root}/models/ok.hef"
    assert resolve_model_path(str(link), model_dirs, lately_only=True) == f"{root}/models/ok.hef"
    trust(0)
    assert _code(str(link), model_dirs)[0] == FORBIDDEN


def test_the_event_loop_only_uses_names_resolved_lately(dirs, trust):
    """``lately_only`` (the event loop's small requests) never resolves a
    name: a client picks how many components a path has, and each costs a
    system call. A name not known, or that leads elsewhere now, goes to a worker."""
    root, model_dirs = dirs
    trust(0)
    link = str(root / "link-in.hef")
    with pytest.raises(NotResolvedLately):
        resolve_model_path(link, model_dirs, lately_only=True)
    assert resolve_model_path(link, model_dirs) == f"{root}/models/ok.hef"        # a worker resolves it
    assert resolve_model_path(link, model_dirs, lately_only=True) == f"{root}/models/ok.hef"
    os.unlink(link)
    os.symlink(root / "secret" / "key.hef", link)
    with pytest.raises(NotResolvedLately):
        resolve_model_path(link, model_dirs, lately_only=True)


def test_a_spec_without_parameters_is_shared_only_while_its_path_is_the_same_checked_object():
    """ModelSpec.of spares a small request a new spec, never across a new
    resolution of its path: after a reload changes model_dirs, the spec
    carries the path as checked against the new folders."""
    from hailo_devmgr.daemon.handlers.generic import GenericHandler
    from hailo_devmgr.daemon.registry import ModelSpec
    old = model_files.AllowedPath("/m/x.hef", ("/m",))
    first = ModelSpec.of("generic", "/m/x.hef", old, {}, GenericHandler)
    assert ModelSpec.of("generic", "/m/x.hef", old, {}, GenericHandler) is first
    new = model_files.AllowedPath("/m/x.hef", ("/m", "/n"))
    again = ModelSpec.of("generic", "/m/x.hef", new, {}, GenericHandler)
    assert again is not first and again.real_path is new and again.real_path.model_dirs == ("/m", "/n")
    assert again == first and again.identity == first.identity == "generic:/m/x.hef"
    tuned = ModelSpec.of("generic", "/m/x.hef", new, {"batch_size": 2}, GenericHandler)
    assert tuned is not ModelSpec.of("generic", "/m/x.hef", new, {"batch_size": 2}, GenericHandler)
