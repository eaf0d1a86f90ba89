"""Configuration: defaults, the conffile, env overrides, and one clear line per defect."""
import re
from dataclasses import fields
from pathlib import Path

import pytest

from hailo_devmgr.daemon import config as cfg

CONFFILE = Path(__file__).resolve().parents[1] / "etc/hailo/device-manager.yaml"


def load_text(tmp_path, text, environ=None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return cfg.load(path, environ or {})


def uncommented_conffile() -> str:
    """The conffile with its commented-out settings switched on.

    Settings are written `#key:` or `#  key:`; prose is `# Text`."""
    lines = []
    for line in CONFFILE.read_text().splitlines():
        if re.match(r"^#(?! )|^#  ", line):
            line = line[1:]
        lines.append(line)
    return "\n".join(lines)


def test_missing_default_file_means_defaults():
    config = cfg.load(None, {"HAILO_DEVICE_CONFIG": ""}, required=False)
    assert config == cfg.Config()


def test_conffile_as_shipped_selects_real_hardware_and_defaults(tmp_path):
    config = cfg.load(CONFFILE, {})
    assert config.backend == "hailo"
    assert config == cfg.Config()


def test_conffile_documents_every_key_with_its_default(tmp_path):
    config = load_text(tmp_path, uncommented_conffile())
    assert len(config.pin) == 1  # the example
    assert cfg.describe(config) | {"pin": []} == cfg.describe(cfg.Config())
    text = CONFFILE.read_text()
    for section in (cfg.Config, cfg.DeviceConfig, cfg.WatchdogConfig, cfg.SimulatedConfig):
        for spec in fields(section):
            assert re.search(rf"^#?\s*{spec.name}:", text, re.M), f"{spec.name} is not in the conffile"


@pytest.mark.parametrize("text, message", [
    ("backend: gpu", "backend: must be one of hailo, simulated, got 'gpu'"),
    ("colour: blue", "colour: unknown key"),
    ("simulated: {load_ms: -1}", "simulated.load_ms: must be between 0 and 600000, got -1"),
    ("simulated: {nope: 1}", "simulated.nope: unknown key"),
    ("max_message_bytes: ten", "max_message_bytes: must be an integer, got 'ten'"),
    ("max_loaded_models: 0", "max_loaded_models: must be between 1 and 64, got 0"),
    ("model_dirs: [relative/path]", "model_dirs: must be an absolute path"),
    ("socket_mode: '0999'", "socket_mode: must be an octal mode"),
    ("watchdog: 5", "watchdog: must be a mapping"),
    ("scheduling: {max_batch_ms: -1}", "scheduling.max_batch_ms: must be between 0.0 and 1000.0, got -1"),
    ("pin: [{model_type: clip}]", "pin: [0] needs model_type and model_path strings"),
    ("backend: [unclosed", "YAML error"),
    ("- a list", "top level: must be a mapping"),
    ("max_message_bytes: 2048\nmax_pending_bytes: 1024", "max_pending_bytes: must be at least max_message_bytes"),
])
def test_each_defect_is_one_line_naming_file_and_key(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError) as info:
        load_text(tmp_path, text)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(str(tmp_path / "c.yaml") + ": ")
    assert message in line


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(cfg.ConfigError, match="file not found"):
        cfg.load(tmp_path / "absent.yaml", {})


def test_environment_overrides_win_and_are_validated(tmp_path):
    environ = {"HAILO_DEVICE_SOCKET": "/tmp/x.sock", "HAILO_DEVICE_MAX_MESSAGE_BYTES": "2048",
               "HAILO_DEVICE_MODEL_DIRS": "/a:/b", "HAILO_DEVICE_BACKEND": "simulated",
               "HAILO_DEVICE_MAX_LOADED_MODELS": "3", "HAILO_DEVICE_LOG_LEVEL": "debug"}
    config = load_text(tmp_path, "backend: hailo\nsocket_path: /run/other.sock\n", environ)
    assert (config.socket_path, config.max_message_bytes, config.model_dirs, config.backend,
            config.max_loaded_models, config.log_level) == (
        "/tmp/x.sock", 2048, ("/a", "/b"), "simulated", 3, "debug")
    with pytest.raises(cfg.ConfigError, match="environment HAILO_DEVICE_MAX_MESSAGE_BYTES: must be an integer"):
        load_text(tmp_path, "", {"HAILO_DEVICE_MAX_MESSAGE_BYTES": "lots"})


def test_hailo_device_config_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backend: simulated\n")
    assert cfg.load(None, {"HAILO_DEVICE_CONFIG": str(path)}).backend == "simulated"


def test_drop_ins_add_model_folders_and_replace_other_keys(tmp_path):
    """A service adds its folder in /etc/hailo/device-manager.d/ without editing the conffile."""
    main = tmp_path / "device-manager.yaml"
    main.write_text("log_level: info\n")
    dropins = tmp_path / "device-manager.d"
    dropins.mkdir()
    (dropins / "20-hailo-ocr.yaml").write_text("model_dirs: [/var/lib/hailo-ocr/models]\nlog_level: debug\n")
    (dropins / "10-hailo-clip.yaml").write_text("model_dirs: [/var/lib/hailo-clip/models]\n")
    (dropins / "notes.txt").write_text("not a drop-in")
    config = cfg.load(main, environ={})
    assert config.model_dirs == (*cfg.DEFAULT_MODEL_DIRS, "/var/lib/hailo-clip/models", "/var/lib/hailo-ocr/models")
    assert config.log_level == "debug"  # a later drop-in replaces a plain key

    main.write_text("model_dirs: [/srv/models]\n")
    assert cfg.load(main, environ={}).model_dirs == (
        "/srv/models", "/var/lib/hailo-clip/models", "/var/lib/hailo-ocr/models")

    (dropins / "30-broken.yaml").write_text("model_dirs: relative/path\n")
    with pytest.raises(cfg.ConfigError, match=r"30-broken\.yaml: model_dirs"):
        cfg.load(main, environ={})


def test_default_model_folders_are_the_standard_system_locations():
    assert cfg.DEFAULT_MODEL_DIRS == ("/usr/share/hailo-models", "/usr/local/hailo/resources/models",
                                      "/var/lib/hailo/models")


def test_a_broken_main_file_is_refused_even_with_drop_ins(tmp_path):
    main = tmp_path / "device-manager.yaml"
    (tmp_path / "device-manager.d").mkdir()
    (tmp_path / "device-manager.d" / "a.yaml").write_text("model_dirs: [/srv/a]\n")
    for text, key in (("model_dirs: /opt/x\n", "model_dirs"), ("watchdog: 5\n", "watchdog"), ("- a\n", "top level")):
        main.write_text(text)
        with pytest.raises(cfg.ConfigError, match=rf"{main}: {key}"):
            cfg.load(main, environ={})
