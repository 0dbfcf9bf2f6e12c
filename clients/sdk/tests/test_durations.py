"""Durations refused by the SDK before any call: the error names the field,
the forms a duration takes, and says "out of range" when the value is one
but too long for a protobuf Duration; `True` is not one second."""

from __future__ import annotations

import pytest

from meshgate.api.v1 import egress_pb2
from meshgate.sdk import DurationError
from meshgate.sdk._build import build

FORMS = "500ms"  # the message lists the forms; one of them is enough to check


@pytest.mark.parametrize("value", ["soon", "500MS", "1h-30m", "5parsecs", "", True, False, float("inf"),
                                   float("nan"), "9" * 400, [1], {"seconds": 1}])
def test_not_a_duration_names_the_field_and_the_forms(value):
    with pytest.raises(DurationError) as e:
        build(egress_pb2.EgressProbe, None, interval=value)
    assert str(e.value).startswith("interval: ") and FORMS in str(e.value), str(e.value)
    assert "must end with letter" not in str(e.value)


@pytest.mark.parametrize("value", ["9999999999999h", 10**12, "-9999999999999h"])
def test_too_long_is_out_of_range(value):
    with pytest.raises(DurationError, match=r"^interval: .*out of range"):
        build(egress_pb2.EgressProbe, None, interval=value)


def test_nested_dict_names_the_path():
    with pytest.raises(DurationError, match=r"^probes\[1\]\.timeout: 'soon' is not a duration"):
        build(egress_pb2.EgressGateway, {"probes": [{"interval": "1s"}, {"interval": "1s", "timeout": "soon"}]})


def test_accepted_forms_still_accepted():
    p = build(egress_pb2.EgressProbe, None, interval="1m30s", timeout=0.25)
    assert (p.interval.seconds, p.timeout.nanos) == (90, 250_000_000)
    p = build(egress_pb2.EgressProbe, {"interval": "-1.5s", "timeout": 2})
    assert (p.interval.seconds, p.interval.nanos, p.timeout.seconds) == (-1, -500_000_000, 2)
