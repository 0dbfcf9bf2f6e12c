"""Every Timestamp and Duration of the API is validated (issue 15, item 5).

`CreateEnrollmentKey` with `expire_time` nanos = 1e9 or seconds =
253402300800 returned INTERNAL; a Duration with nanos = 2e9 and rotation
periods of 1 ns were stored. The fields are found by walking the request
descriptors of every RPC the control plane serves (no hand-kept list), and each
is sent out of range through raw gRPC: INVALID_ARGUMENT naming its path, and
nothing stored.
"""

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from cptest import details, make_network, state_dump
from meshgate.api.v1 import (
    agent_pb2,
    auth_pb2,
    egress_pb2,
    enrollment_pb2,
    events_pb2,
    external_client_pb2,
    network_pb2,
    node_pb2,
    policy_pb2,
)

MODULES = (network_pb2, node_pb2, egress_pb2, enrollment_pb2, policy_pb2, external_client_pb2, auth_pb2,
           agent_pb2, events_pb2)
WKT = {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}

BAD = {
    "timestamp": {
        "nanos 1e9": timestamp_pb2.Timestamp(seconds=1, nanos=1_000_000_000),
        "negative nanos": timestamp_pb2.Timestamp(seconds=1, nanos=-1),
        "after 9999": timestamp_pb2.Timestamp(seconds=253402300800),
        "before 0001": timestamp_pb2.Timestamp(seconds=-62135596801),
    },
    "duration": {
        "nanos 2e9": duration_pb2.Duration(seconds=1, nanos=2_000_000_000),
        "signs differ": duration_pb2.Duration(seconds=1, nanos=-1),
        "beyond 10000 years": duration_pb2.Duration(seconds=315576000001),
    },
}


def time_fields(descriptor, prefix="", seen=()):
    """(path, kind) of every Timestamp/Duration under a message descriptor."""
    out = []
    for f in descriptor.fields:
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        path = prefix + f.name + ("[0]" if f.is_repeated else "")
        kind = WKT.get(f.message_type.full_name)
        if kind:
            out.append((path, kind))
        elif f.message_type.full_name not in seen and not f.message_type.full_name.startswith("google.protobuf"):
            out += time_fields(f.message_type, path + ".", (*seen, f.message_type.full_name))
    return out


def methods():
    """(service, method descriptor, path, kind) of every unary-request RPC the
    control plane serves, for each time field of its request."""
    out = []
    for m in MODULES:
        for svc in m.DESCRIPTOR.services_by_name.values():
            for md in svc.methods:
                if md.client_streaming:
                    continue
                for path, kind in time_fields(md.input_type):
                    out.append((svc, md, path, kind))
    return out


CASES = {f"{md.name}.{path}:{bad}": (svc, md, path, kind, bad)
         for svc, md, path, kind in methods() for bad in BAD[kind]}


def test_the_generated_cases_cover_the_time_fields_we_know():
    names = {c.split(":")[0] for c in CASES}
    for known in ("CreateEnrollmentKey.enrollment_key.expire_time", "CreateNetwork.network.max_node_key_age",
                  "UpdateNetwork.network.preshared_key_rotation_period", "CreateToken.token.expire_time",
                  "ListAuditRecords.start_time", "UpdateNetwork.network.persistent_keepalive"):
        assert known in names, known


def set_path(msg, path, value):
    *parents, last = path.split(".")
    for part in parents:
        name, _, idx = part.partition("[")
        msg = getattr(msg, name).add() if idx else getattr(msg, name)
    name, _, idx = last.partition("[")
    (getattr(msg, name).add() if idx else getattr(msg, name)).CopyFrom(value)


def request_class(md):
    return next(getattr(m, md.input_type.name) for m in MODULES if md.input_type.name in m.DESCRIPTOR.message_types_by_name
                and m.DESCRIPTOR.message_types_by_name[md.input_type.name] is md.input_type)


def response_class(md):
    from google.protobuf import empty_pb2

    if md.output_type.full_name == "google.protobuf.Empty":
        return empty_pb2.Empty
    return next(getattr(m, md.output_type.name) for m in MODULES
                if m.DESCRIPTOR.message_types_by_name.get(md.output_type.name) is md.output_type)


@pytest.fixture
async def world(cp):
    await make_network(cp, "prod", "100.64.0.0/24")
    return cp


@pytest.mark.parametrize("case", sorted(CASES))
async def test_out_of_range_times_are_invalid_argument_naming_the_field(world, case):
    svc, md, path, kind, bad = CASES[case]
    req = request_class(md)()
    # Enough of a request to name a real parent where one is asked for: the
    # time must be refused as such, whatever else the request holds.
    for fname in ("parent",):
        if fname in md.input_type.fields_by_name:
            setattr(req, fname, "networks/prod")
    set_path(req, path, BAD[kind][bad])
    before = await state_dump(world.etcd)
    target = f"/{svc.full_name}/{md.name}"
    ser, de = req.SerializeToString, response_class(md).FromString
    with pytest.raises(grpc.aio.AioRpcError) as e:
        if md.server_streaming:
            async for _ in world.channel.unary_stream(target, request_serializer=lambda r: r.SerializeToString(),
                                                      response_deserializer=de)(req):
                break
        else:
            await world.channel.unary_unary(target, request_serializer=lambda r: r.SerializeToString(),
                                            response_deserializer=de)(req)
    del ser
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    violations, reason = details(e.value)
    assert path in violations, violations
    assert kind in violations[path]
    assert reason == "INVALID_FIELD"
    assert await state_dump(world.etcd) == before


@pytest.mark.parametrize("expire", [timestamp_pb2.Timestamp(seconds=4102444800, nanos=1_000_000_000),
                                    timestamp_pb2.Timestamp(seconds=253402300800)])
async def test_enrollment_key_with_an_impossible_expiry_is_invalid_argument(world, expire):
    before = await state_dump(world.etcd)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await world.keys.CreateEnrollmentKey(enrollment_pb2.CreateEnrollmentKeyRequest(
            parent="networks/prod", enrollment_key_id="k",
            enrollment_key=enrollment_pb2.EnrollmentKey(expire_time=expire)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "enrollment_key.expire_time" in details(e.value)[0]
    assert await state_dump(world.etcd) == before


D = duration_pb2.Duration
NETWORK_DURATIONS = {
    # field: (refused values, accepted values)
    "persistent_keepalive": ([D(nanos=1), D(seconds=1, nanos=500_000_000), D(seconds=3601), D(seconds=-1)],
                             [D(), D(seconds=1), D(seconds=25), D(seconds=3600)]),
    "max_node_key_age": ([D(nanos=1), D(seconds=1), D(seconds=3599), D(seconds=-3600)],
                         [D(), D(seconds=3600), D(seconds=90 * 86400)]),
    "preshared_key_rotation_period": ([D(nanos=1), D(seconds=59), D(seconds=3599)],
                                      [D(), D(seconds=3600), D(seconds=86400)]),
}


@pytest.mark.parametrize("fname", sorted(NETWORK_DURATIONS))
async def test_network_durations_have_sensible_bounds(world, fname):
    from google.protobuf import field_mask_pb2

    refused, accepted = NETWORK_DURATIONS[fname]
    for value in refused:
        before = await state_dump(world.etcd)
        for call in ("create", "update"):
            net = network_pb2.Network(name="networks/prod", ipv4_cidr="100.64.7.0/24")
            getattr(net, fname).CopyFrom(value)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                if call == "create":
                    await world.networks.CreateNetwork(network_pb2.CreateNetworkRequest(network_id="n7", network=net))
                else:
                    await world.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
                        network=net, update_mask=field_mask_pb2.FieldMask(paths=[fname])))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (fname, value, call)
            assert f"network.{fname}" in details(e.value)[0], (fname, value, call)
        assert await state_dump(world.etcd) == before
    for value in accepted:
        net = network_pb2.Network(name="networks/prod")
        getattr(net, fname).CopyFrom(value)
        got = await world.networks.UpdateNetwork(network_pb2.UpdateNetworkRequest(
            network=net, update_mask=field_mask_pb2.FieldMask(paths=[fname])))
        if value.seconds or value.nanos or fname != "persistent_keepalive":
            assert getattr(got, fname) == value
