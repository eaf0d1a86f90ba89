"""The running configuration (daemon/settings.py): one object, replaced whole."""
from __future__ import annotations

from dataclasses import replace

from hailo_devmgr.daemon.config import Config, DeviceConfig, PinnedModel, SchedulingConfig
from hailo_devmgr.daemon.settings import Settings, pin_keys


def test_a_reload_applies_what_it_may_and_keeps_what_needs_a_restart():
    running = Config(backend="simulated", max_loaded_models=2)
    settings = Settings(running)
    new = replace(running, backend="hailo", socket_path="/elsewhere.sock", max_loaded_models=5,
                  device=DeviceConfig(retry_s=99), scheduling=SchedulingConfig(policy="fifo", max_queue=9))
    waiting = settings.replace(new)
    assert waiting == ["backend", "socket_path", "device", "scheduling.policy"]
    now = settings.config
    assert (now.max_loaded_models, now.scheduling.max_queue) == (5, 9)       # applied
    assert (now.backend, now.socket_path, now.device, now.scheduling.policy) == \
        (running.backend, running.socket_path, running.device, running.scheduling.policy)  # kept


def test_watchers_run_after_the_swap_and_see_the_new_object():
    settings = Settings(Config(max_loaded_models=2))
    seen = []
    settings.watch(lambda: seen.append(settings.config.max_loaded_models))
    settings.replace(Config(max_loaded_models=3))
    assert seen == [3]


def test_what_is_derived_is_made_once_per_configuration():
    made = []

    def pins(config):
        made.append(config)
        return pin_keys(config)
    settings = Settings(Config(pin=(PinnedModel("generic", "/m/a.hef", {}),)))
    assert settings.derived(pins) == {"generic:/m/a.hef"}
    assert settings.derived(pins) == {"generic:/m/a.hef"} and len(made) == 1
    settings.replace(Config())
    assert settings.derived(pins) == frozenset() and len(made) == 2
