"""Kernel uevent datagrams: recorded payloads parse; udev's re-broadcasts and garbage give
None; whatever the bytes, the parser answers a Uevent or None and never raises."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.uevent import Uevent, parse_uevent

FUZZ = settings(deadline=timedelta(milliseconds=200), database=None, derandomize=True)

# As the kernel sends them (lib/kobject_uevent.c): "ACTION@DEVPATH\0" then KEY=VALUE\0 pairs.
MODULE_ADD = (
    b"add@/module/virtio_net\0ACTION=add\0DEVPATH=/module/virtio_net\0"
    b"SUBSYSTEM=module\0SEQNUM=1234\0"
)
PCI_ADD = (
    b"add@/devices/pci0000:00/0000:00:05.0\0ACTION=add\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:05.0\0SUBSYSTEM=pci\0"
    b"PCI_CLASS=20000\0PCI_ID=1AF4:1000\0PCI_SUBSYS_ID=1AF4:0001\0PCI_SLOT_NAME=0000:00:05.0\0"
    b"MODALIAS=pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00\0SEQNUM=1301\0"
)
MODULE_REMOVE = (
    b"remove@/module/virtio_net\0ACTION=remove\0DEVPATH=/module/virtio_net\0"
    b"SUBSYSTEM=module\0SEQNUM=1402\0"
)
BLOCK_CHANGE = (
    b"change@/devices/pci0000:00/0000:00:04.0/virtio1/block/vda\0ACTION=change\0"
    b"DEVPATH=/devices/pci0000:00/0000:00:04.0/virtio1/block/vda\0SUBSYSTEM=block\0"
    b"RESIZE=1\0MAJOR=254\0MINOR=0\0DEVNAME=vda\0DEVTYPE=disk\0DISKSEQ=1\0SEQNUM=1500\0"
)
# udev's monitor header (struct udev_monitor_netlink_header), then the properties.
UDEV_REBROADCAST = (
    b"libudev\0\xfe\xed\xca\xfe\x28\0\0\0\x28\0\0\0\x60\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"
    b"ACTION=add\0DEVPATH=/module/virtio_net\0SUBSYSTEM=module\0SEQNUM=1234\0"
    b"USEC_INITIALIZED=123456\0"
)


def test_module_add_event_reports_the_module_loaded() -> None:
    event = parse_uevent(MODULE_ADD)
    assert event is not None
    assert (event.action, event.devpath, event.subsystem, event.modalias) == (
        "add", "/module/virtio_net", "module", None
    )
    assert event.env["SEQNUM"] == "1234"
    assert event.module_loaded == "virtio_net"


def test_pci_device_add_carries_its_modalias() -> None:
    event = parse_uevent(PCI_ADD)
    assert event is not None
    assert event.subsystem == "pci"
    assert event.modalias == "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
    assert event.env["PCI_SLOT_NAME"] == "0000:00:05.0"
    assert event.module_loaded is None


def test_module_remove_is_not_a_module_load() -> None:
    event = parse_uevent(MODULE_REMOVE)
    assert event is not None and event.action == "remove"
    assert event.module_loaded is None


def test_block_change_event_parses_with_every_key() -> None:
    event = parse_uevent(BLOCK_CHANGE)
    assert event is not None
    assert event.env["DEVNAME"] == "vda" and event.env["RESIZE"] == "1"
    assert len(event.env) == 10


def test_module_name_with_dash_is_normalised() -> None:
    data = b"add@/module/snd-hda-intel\0ACTION=add\0DEVPATH=/module/snd-hda-intel\0" \
           b"SUBSYSTEM=module\0SEQNUM=9\0"
    event = parse_uevent(data)
    assert event is not None and event.module_loaded == "snd_hda_intel"


def test_udev_rebroadcast_is_not_a_kernel_event() -> None:
    assert parse_uevent(UDEV_REBROADCAST) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0\0\0",
        b"add/module/virtio_net\0ACTION=add\0",  # no '@'
        b"@/module/x\0",  # no action
        b"add@module/x\0",  # devpath not absolute
        b"ADD@/module/x\0",  # actions are lower case
        b"add@/module/x\0ACTION=remove\0",  # header and pairs disagree
        b"add@/module/x\0DEVPATH=/module/y\0",
        b"add@/module/\xff\xfe\0ACTION=add\0",  # devpath not UTF-8
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR",
    ],
)
def test_malformed_datagrams_give_none(data: bytes) -> None:
    assert parse_uevent(data) is None


def test_device_supplied_value_in_another_encoding_is_kept_not_fatal() -> None:
    data = (b"add@/devices/virtual/input/input7\0ACTION=add\0SUBSYSTEM=input\0"
            b"NAME=\"Tastatur \xe4\"\0")
    event = parse_uevent(data)
    assert event is not None and event.env["NAME"] == '"Tastatur \ufffd"'


def test_module_event_with_impossible_name_loads_nothing() -> None:
    event = parse_uevent(b"add@/module/a/b\0ACTION=add\0SUBSYSTEM=module\0")
    assert event is not None and event.module_loaded is None


def test_uevent_is_immutable_and_hashable() -> None:
    event = parse_uevent(MODULE_ADD)
    assert event is not None
    with pytest.raises(TypeError):
        event.env["ACTION"] = "remove"  # type: ignore[index]
    assert hash(event) == hash(parse_uevent(MODULE_ADD))
    assert event == parse_uevent(MODULE_ADD)
    assert event != parse_uevent(MODULE_ADD.replace(b"1234", b"1235"))


@FUZZ
@given(st.binary(max_size=512))
def test_any_bytes_give_a_uevent_or_none(data: bytes) -> None:
    result = parse_uevent(data)
    assert result is None or isinstance(result, Uevent)


_FIELD = st.binary(max_size=24) | st.sampled_from(
    [b"ACTION=add", b"SUBSYSTEM=module", b"DEVPATH=/module/x", b"MODALIAS=pci:v*", b"=",
     b"SEQNUM=", b"\xff=\xfe", b"KEY"]
)


@FUZZ
@given(
    st.sampled_from([b"add", b"remove", b"bind", b"", b"ADD", b"\xc3"]),
    st.sampled_from([b"/module/x", b"/devices/pci0000:00", b"", b"x", b"/\xff"]),
    st.lists(_FIELD, max_size=8),
    st.sampled_from([b"@", b"", b"@@"]),
)
def test_kernel_shaped_datagrams_give_a_uevent_or_none(
    action: bytes, devpath: bytes, fields: list[bytes], at: bytes
) -> None:
    data = action + at + devpath + b"\0" + b"\0".join(fields)
    result = parse_uevent(data)
    assert result is None or isinstance(result, Uevent)
    if result is not None:
        assert result.action == action.decode() and result.devpath.startswith("/")
        assert result.env.get("ACTION", result.action) == result.action
        if result.module_loaded is not None:
            assert result.subsystem == "module" and result.action == "add"
