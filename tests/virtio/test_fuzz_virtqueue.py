"""The queue fuzzer: 100000 hostile inputs without a crash or a broken invariant, and an oracle
that does catch a device that acts before it has validated a chain."""

from __future__ import annotations

import pytest
from conftest import slow

from memslots.devices.virtio_mem.wire import RESPONSE_SIZE, Request
from memslots.errors import DeviceError
from memslots.testing.fuzz import QueueFuzzer
from memslots.virtio import transport as virtio_transport
from memslots.virtio import virtqueue
from memslots.virtio.virtqueue import Chain


@slow
def test_100k_inputs_no_failure() -> None:
    with QueueFuzzer(seed=20240611) as fuzzer:
        report = fuzzer.run(inputs=100_000)
    assert report.failures == []
    assert report.inputs == 100_000
    # The generator reaches every kind of refusal ...
    refusals = {
        cls.__name__
        for cls in (
            virtqueue.QueueSetupError,
            virtqueue.RingAccessError,
            virtqueue.AvailIndexError,
            virtqueue.DescriptorIndexError,
            virtqueue.DescriptorLoopError,
            virtqueue.DescriptorOrderError,
            virtqueue.BufferAddressError,
            virtqueue.IndirectDescriptorError,
            DeviceError,  # short request or response, unknown type
        )
    }
    assert refusals <= set(report.errors), refusals - set(report.errors)
    # ... and every answer that changes or reports state, so valid chains get through too.
    for answer in ("plug/ack", "plug/nack", "unplug/ack", "unplug_all/ack", "state/ack"):
        assert report.responses[answer] > 0, answer
    assert 0 < report.violations < report.inputs


def test_the_oracle_catches_acting_before_validating(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport that executes a request before checking the response buffer is caught."""
    original = virtio_transport.VirtioMemTransport._request

    def hasty(self: virtio_transport.VirtioMemTransport, chain: Chain) -> Request:
        if chain.in_len < RESPONSE_SIZE and chain.out_len >= 24:
            req = Request.unpack(chain.read_out(24))
            if req.type <= 3:
                self.dev.execute(req)
        return original(self, chain)

    monkeypatch.setattr(virtio_transport.VirtioMemTransport, "_request", hasty)
    with QueueFuzzer(seed=1) as fuzzer:
        report = fuzzer.run(inputs=20_000)
    assert report.failures
    assert "executed but not answered" in report.failures[0]
