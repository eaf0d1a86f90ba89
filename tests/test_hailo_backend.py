"""The real HailoRT backend against a fake ``hailo_platform`` module.

No HailoRT is installed here: the fake imitates only the calls the backend
makes (VDevice.create_params/VDevice/release, Device(...) as a context
manager, control.identify/get_chip_temperature, Device.scan), with the
exception texts HAILORT.md records.
"""
from __future__ import annotations

import enum
import sys
import types

import pytest

from hailo_devmgr.daemon.backends import BackendUnavailable, DeviceIdentity
from hailo_devmgr.daemon.backends.hailo import HailoBackend
from hailo_devmgr.daemon.config import DeviceConfig

DEVICE_ID = "0001:01:00.0"


class HailoRTException(Exception):
    pass


class DeviceArchitectureTypes(enum.IntEnum):
    HAILO8 = 1
    HAILO8L = 2
    HAILO10H = 6


def make_platform(*, vdevice_error=None, identify_error=None, temperature_error=None,
                  device_ids=(DEVICE_ID,), architecture=DeviceArchitectureTypes.HAILO10H):
    """A fake hailo_platform module; ``record`` collects what the backend did."""
    record = types.SimpleNamespace(params=None, vdevices=[], devices=[], identify_calls=0, order=[])

    class VDevice:
        @staticmethod
        def create_params():
            return types.SimpleNamespace(device_count=1, device_ids=[], scheduling_algorithm=1,
                                         group_id="UNIQUE", multi_process_service=False)

        def __init__(self, params=None):
            if vdevice_error is not None:
                raise vdevice_error
            record.params = params
            self.released = 0
            record.vdevices.append(self)
            record.order.append("VDevice")

        def get_physical_devices_ids(self):
            return list(device_ids)

        def release(self):
            self.released += 1

    class Control:
        def identify(self):
            record.identify_calls += 1
            if identify_error is not None:
                raise identify_error
            return types.SimpleNamespace(device_architecture=architecture,
                                         firmware_version="5.3.0 (release,app)",
                                         board_name="Hailo-10H", product_name="")

        def get_chip_temperature(self):
            if temperature_error is not None:
                raise temperature_error
            return types.SimpleNamespace(ts0_temperature=52.5, ts1_temperature=54.25,
                                         sample_count=3)

    class Device:
        def __init__(self, device_id=None):
            self.device_id = device_id
            self.control = Control()
            self.released = 0
            record.devices.append(self)
            record.order.append("Device")

        @staticmethod
        def scan():
            return [DEVICE_ID]

        def release(self):
            self.released += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.release()

    module = types.SimpleNamespace(__version__="5.3.0", VDevice=VDevice, Device=Device,
                                   HailoRTException=HailoRTException)
    return module, record


def importer_of(module, genai=None):
    """``import_module`` for the fake: ``hailo_platform.genai`` only when ``genai`` is given
    (then set on the top module, as the import system does for a submodule)."""
    def importer(name):
        if name == "hailo_platform.genai":
            if genai is None:
                raise ModuleNotFoundError("No module named 'hailo_platform.genai'", name=name)
            module.genai = genai
            return genai
        assert name == "hailo_platform"
        return module
    return importer


@pytest.fixture
def dev_dir(tmp_path):
    (tmp_path / "hailo0").touch()
    return tmp_path


def backend_with(module, dev_dir, *, group_id="UNIQUE", access=lambda path, mode: True, **kwargs):
    return HailoBackend(DeviceConfig(group_id=group_id), importer_of(module),
                        dev_dir=str(dev_dir), access=access, **kwargs)


# -- opening -----------------------------------------------------------------

def test_not_installed_names_the_packages(dev_dir):
    def importer(name):
        raise ModuleNotFoundError(f"No module named '{name}'")
    backend = HailoBackend(DeviceConfig(), importer, dev_dir=str(dev_dir))
    with pytest.raises(BackendUnavailable) as info:
        backend.open_vdevice()
    message = str(info.value)
    assert "HailoRT Python package (hailo_platform) is not installed" in message
    assert "No module named 'hailo_platform'" in message
    assert "python3-h10-hailort (Hailo-10H)" in message
    assert "python3-hailort (Hailo-8)" in message


def test_broken_install_is_reported_not_raised(dev_dir):
    def importer(name):
        raise AttributeError("_ARRAY_API not found")
    backend = HailoBackend(DeviceConfig(), importer, dev_dir=str(dev_dir))
    with pytest.raises(BackendUnavailable, match="failed to import: AttributeError"):
        backend.open_vdevice()


def test_platform_before_open_is_unavailable():
    module, _ = make_platform()
    backend = HailoBackend(DeviceConfig(), importer_of(module))
    with pytest.raises(BackendUnavailable):
        backend.platform


def test_import_is_lazy_and_done_once(dev_dir):
    module, _ = make_platform()
    calls = []

    def importer(name):
        calls.append(name)
        return importer_of(module)(name)
    backend = HailoBackend(DeviceConfig(), importer, dev_dir=str(dev_dir), access=lambda p, m: True)
    assert calls == []
    backend.open_vdevice()
    backend.open_vdevice()
    assert calls == ["hailo_platform", "hailo_platform.genai"]
    assert backend.platform is module


def test_python_path_is_prepended_before_import(dev_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", ["/usr/lib/python3/dist-packages"])
    module, _ = make_platform()
    seen = []

    def importer(name):
        seen.append(list(sys.path))
        return importer_of(module)(name)
    backend = HailoBackend(DeviceConfig(), importer, dev_dir=str(dev_dir), access=lambda p, m: True,
                           python_path=("/opt/hailort/a", "/opt/hailort/b"))
    assert sys.path == ["/usr/lib/python3/dist-packages"]  # nothing before the first open
    backend.open_vdevice()
    assert seen[0] == ["/opt/hailort/a", "/opt/hailort/b", "/usr/lib/python3/dist-packages"]


def test_failed_import_is_retried_without_growing_sys_path(dev_dir, monkeypatch):
    monkeypatch.setattr(sys, "path", [])
    module, _ = make_platform()
    attempts = []

    def importer(name):
        attempts.append(name)
        if len(attempts) == 1:
            raise ImportError("libhailort.so.5.3.0: cannot open shared object file")
        return module
    backend = HailoBackend(DeviceConfig(), importer, dev_dir=str(dev_dir), access=lambda p, m: True,
                           python_path=("/opt/hailort",))
    with pytest.raises(BackendUnavailable, match="also searched /opt/hailort"):
        backend.open_vdevice()
    backend.open_vdevice()
    assert sys.path == ["/opt/hailort"]


def test_no_device_node(tmp_path):
    module, record = make_platform()
    backend = backend_with(module, tmp_path)
    with pytest.raises(BackendUnavailable) as info:
        backend.open_vdevice()
    message = str(info.value)
    assert message.startswith("no Hailo device node (")
    assert f"{tmp_path}/hailo*" in message and f"{tmp_path}/h1x-*" in message
    assert "is the PCIe driver loaded?" in message
    assert record.vdevices == []


def test_5_3_driver_node_name_is_accepted(tmp_path):
    (tmp_path / "h1x-0").touch()
    module, record = make_platform()
    backend_with(module, tmp_path).open_vdevice()
    assert len(record.vdevices) == 1


def test_node_without_permission(dev_dir):
    module, record = make_platform()
    checked = []

    def access(path, mode):
        checked.append((path, mode))
        return False
    backend = backend_with(module, dev_dir, access=access)
    with pytest.raises(BackendUnavailable) as info:
        backend.open_vdevice()
    message = str(info.value)
    assert str(dev_dir / "hailo0") in message
    assert "group 'hailo'" in message
    assert checked and checked[0][1] == 6  # os.R_OK | os.W_OK
    assert record.vdevices == []


def test_one_usable_node_is_enough(dev_dir):
    (dev_dir / "hailo1").touch()
    module, record = make_platform()
    backend = backend_with(module, dev_dir, access=lambda path, mode: path.endswith("hailo1"))
    backend.open_vdevice()
    assert len(record.vdevices) == 1


@pytest.mark.parametrize("text", [
    "libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)",
    "libhailort failed with error: 73 (HAILO_DEVICE_IN_USE)",
])
def test_device_owned_elsewhere(dev_dir, text):
    module, _ = make_platform(vdevice_error=Exception(text))
    backend = backend_with(module, dev_dir)
    with pytest.raises(BackendUnavailable) as info:
        backend.open_vdevice()
    message = str(info.value)
    assert message.startswith("device owned by another process (")
    assert text in message


def test_open_file_failure_gives_permission_hint(dev_dir):
    error = HailoRTException("libhailort failed with error: 13 (HAILO_OPEN_FILE_FAILURE)")
    module, _ = make_platform(vdevice_error=error)
    with pytest.raises(BackendUnavailable) as info:
        backend_with(module, dev_dir).open_vdevice()
    assert "read/write access" in str(info.value) and "group 'hailo'" in str(info.value)


def test_typed_exception_status_from_cause(dev_dir):
    # The typed form: a subclass whose __cause__ carries the number.
    class HailoRTDriverOperationFailedException(HailoRTException):
        pass
    try:
        try:
            raise Exception(36)
        except Exception as status:
            raise HailoRTDriverOperationFailedException("Failure in hailort driver ioctl") from status
    except HailoRTException as exc:
        error = exc
    module, _ = make_platform(vdevice_error=error)
    with pytest.raises(BackendUnavailable) as info:
        backend_with(module, dev_dir).open_vdevice()
    message = str(info.value)
    assert "HAILO_DRIVER_OPERATION_FAILED (36)" in message
    assert "dmesg" in message


def test_other_failure_is_described(dev_dir):
    module, _ = make_platform(vdevice_error=HailoRTException("HailoRT device not found in the system"))
    with pytest.raises(BackendUnavailable, match="cannot open the Hailo device: HailoRT device not found"):
        backend_with(module, dev_dir).open_vdevice()


# -- success path ------------------------------------------------------------

def test_success_sets_group_id_and_reports_device(dev_dir):
    module, record = make_platform()
    backend = backend_with(module, dev_dir, group_id="SHARED")
    vdevice = backend.open_vdevice()
    assert record.params.group_id == "SHARED"
    assert vdevice is record.vdevices[0]

    identity = backend.identify(vdevice)
    assert identity == DeviceIdentity(DEVICE_ID, "HAILO10H", "5.3.0 (release,app)")
    assert record.devices[0].device_id == DEVICE_ID
    assert record.order == ["Device", "VDevice"]  # the order known to work on a 10H
    assert record.devices[0].released == 0  # kept for temperature until close

    assert backend.temperature(vdevice) == 54.25
    assert isinstance(backend.temperature(vdevice), float)


def test_identity_is_cached_after_success(dev_dir):
    module, record = make_platform()
    backend = backend_with(module, dev_dir)
    vdevice = backend.open_vdevice()
    first = backend.identify(vdevice)
    assert backend.identify(vdevice) == first
    assert record.identify_calls == 1


@pytest.mark.parametrize("architecture", [
    "DeviceArchitectureTypes.HAILO8L",   # a qualified str()
    "HAILO8L",                           # a bare str()
    DeviceArchitectureTypes.HAILO8L,     # the IntEnum itself (str() is "2" on 3.11+)
])
def test_architecture_name_forms(dev_dir, architecture):
    module, _ = make_platform(architecture=architecture)
    backend = backend_with(module, dev_dir)
    assert backend.identify(backend.open_vdevice()).architecture == "HAILO8L"


def test_identify_falls_back_to_scan(dev_dir):
    module, record = make_platform(device_ids=())
    backend = backend_with(module, dev_dir)
    identity = backend.identify(backend.open_vdevice())
    assert identity.device_id == DEVICE_ID
    assert identity.architecture == "HAILO10H"


def test_identify_failure_gives_none_fields_and_is_retried(dev_dir):
    module, record = make_platform(identify_error=HailoRTException(
        "libhailort failed with error: 62 (HAILO_COMMUNICATION_CLOSED)"))
    backend = backend_with(module, dev_dir)
    vdevice = backend.open_vdevice()
    identity = backend.identify(vdevice)
    assert identity.architecture is None and identity.fw_version is None
    assert identity.device_id == DEVICE_ID  # known even though identify() failed
    backend.identify(vdevice)
    assert record.identify_calls == 2  # a failure is not cached


def test_identify_without_any_device_id(dev_dir):
    module, _ = make_platform(device_ids=())
    module.Device.scan = staticmethod(lambda: [])
    backend = backend_with(module, dev_dir)
    assert backend.identify(backend.open_vdevice()) == DeviceIdentity(None, None, None)


def test_temperature_keeps_one_device_open_until_close(dev_dir):
    module, record = make_platform()
    backend = backend_with(module, dev_dir)
    vdevice = backend.open_vdevice()
    backend.temperature(vdevice)
    backend.temperature(vdevice)
    assert len(record.devices) == 1 and record.devices[0].released == 0
    backend.close_vdevice(vdevice)
    assert record.devices[0].released == 1
    assert vdevice.released == 1


def test_temperature_failure_is_none_until_the_device_is_reopened(dev_dir):
    module, record = make_platform(temperature_error=HailoRTException(
        "libhailort failed with error: 96 (HAILO_DEVICE_NOT_CONNECTED)"))
    backend = backend_with(module, dev_dir)
    vdevice = backend.open_vdevice()
    assert backend.temperature(vdevice) is None
    assert backend.temperature(vdevice) is None
    assert len(record.devices) == 1  # reopened only with the VDevice (after a rebuild)
    backend.close_vdevice(vdevice)
    backend.open_vdevice()
    assert len(record.devices) == 2


# -- the rest ----------------------------------------------------------------

def test_close_swallows_release_errors(dev_dir, caplog):
    module, record = make_platform()
    backend = backend_with(module, dev_dir)
    vdevice = backend.open_vdevice()
    backend.temperature(vdevice)

    def fail():
        raise HailoRTException("libhailort failed with error: 77 (HAILO_RPC_FAILED)")
    record.devices[0].release = fail
    vdevice.release = fail
    backend.close_vdevice(vdevice)
    assert caplog.text.count("HAILO_RPC_FAILED") == 2


def test_the_real_backend_has_no_request_knobs():
    """The simulated backend's model_params knobs mean nothing on hardware:
    ignored, whoever asks, and nothing applies around the inference."""
    module, _ = make_platform()
    backend = HailoBackend(DeviceConfig(), importer_of(module))
    assert backend.request_options({"simulate_ms": -5, "simulate_hang_ms": "x"}, 30.0, 1000) is None
    with backend.request_scope(None) as value:
        assert value is None
    assert backend.name == "hailo"


def test_importing_the_module_imports_no_hailort():
    assert "hailo_platform" not in sys.modules


# -- genai: a subpackage `import hailo_platform` does not import ---------------

def test_genai_is_imported_explicitly_and_reachable_as_an_attribute(dev_dir):
    module, _ = make_platform()
    genai = types.SimpleNamespace(VLM=object)
    backend = HailoBackend(DeviceConfig(), importer_of(module, genai), dev_dir=str(dev_dir),
                           access=lambda p, m: True)
    assert not hasattr(module, "genai")  # as on a real HailoRT 5.x before the import
    backend.open_vdevice()
    assert backend.platform.genai is genai and backend.genai_missing is None
    assert backend.hailort_version == "5.3.0"


def test_without_genai_the_reason_names_the_version(dev_dir):
    module, _ = make_platform()
    module.__version__ = "4.23.0"
    backend = backend_with(module, dev_dir)
    backend.open_vdevice()
    assert backend.genai_missing.startswith("HailoRT 4.23.0 has no hailo_platform.genai")


def test_a_vdevice_that_fails_to_open_releases_the_device_opened_before_it(dev_dir):
    module, record = make_platform(vdevice_error=HailoRTException(
        "libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)"))
    backend = backend_with(module, dev_dir)
    with pytest.raises(BackendUnavailable, match="owned by another process"):
        backend.open_vdevice()
    assert [device.released for device in record.devices] == [1]
