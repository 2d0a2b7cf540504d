"""Queries from the official service SDKs, unmodified: azure-iot-hub's
`IoTHubRegistryManager.query_iot_hub` (tag and reported-property conditions, paging with the
continuation token) and azure-iothub's `Registry.createQuery(...).nextAsTwin()` (Node, paging
through several pages until `hasMoreResults` is false)."""

import subprocess
import uuid

from azure.iot.hub.models import QuerySpecification, Twin

from ferrohub_helpers import CONNECT_TIMEOUT, SEND_TIMEOUT, call_with_timeout, parse_connection_string
from test_node_clients import NODE_DIR, _env, _finish, _line


def _tagged_devices(create_device, registry_manager, n: int, run: str):
    """n new devices tagged {"run": run, "n": i}; their connection strings and ids."""
    made = []
    for i in range(n):
        cs = create_device()
        device_id = parse_connection_string(cs)["DeviceId"]
        registry_manager.update_twin(device_id, Twin(tags={"run": run, "n": i}), "*")
        made.append((cs, device_id))
    return made


def _all_pages(registry_manager, query: str, page: int):
    """Every page of query through query_iot_hub, following continuation tokens."""
    pages, token = [], None
    while True:
        result = registry_manager.query_iot_hub(QuerySpecification(query=query), token, page)
        pages.append(result)
        token = result.continuation_token
        if not token:
            return pages
        assert len(pages) < 50, "the pages never end"


def test_python_query_pages_twins_by_tag(create_device, registry_manager):
    run = f"q{uuid.uuid4().hex[:8]}"
    devices = _tagged_devices(create_device, registry_manager, 5, run)
    pages = _all_pages(registry_manager, f"SELECT * FROM devices WHERE tags.run = '{run}'", 2)
    assert [len(p.items) for p in pages] == [2, 2, 1], "pages end exactly at the last one"
    assert all(p.type == "twin" for p in pages)
    twins = [t for p in pages for t in p.items]
    assert sorted(t.device_id for t in twins) == sorted(d for _, d in devices)
    assert all(t.tags["run"] == run and t.etag for t in twins)

    ranged = registry_manager.query_iot_hub(
        QuerySpecification(query=f"SELECT * FROM devices WHERE tags.run = '{run}' AND tags.n >= 3"), None, 100)
    assert sorted(t.tags["n"] for t in ranged.items) == [3, 4]
    assert not ranged.continuation_token

    counted = registry_manager.query_iot_hub(
        QuerySpecification(query=f"SELECT COUNT() AS total FROM devices WHERE tags.run = '{run}'"), None, 10)
    assert counted.type == "raw"


def test_python_query_sees_reported_properties_from_the_device_sdk(
        create_device, registry_manager, device_clients):
    run = f"q{uuid.uuid4().hex[:8]}"
    (cs, device_id), (_, other) = _tagged_devices(create_device, registry_manager, 2, run)
    client = device_clients(cs)
    call_with_timeout(client.connect, CONNECT_TIMEOUT, "connect()")
    call_with_timeout(lambda: client.patch_twin_reported_properties({"temperature": 41.5, "fw": {"v": "2.0"}}),
                      SEND_TIMEOUT, "patch_twin_reported_properties()")
    query = (f"SELECT * FROM devices WHERE tags.run = '{run}' AND properties.reported.temperature > 40 "
             f"AND properties.reported.fw.v = '2.0'")
    result = registry_manager.query_iot_hub(QuerySpecification(query=query), None, 100)
    assert [t.device_id for t in result.items] == [device_id]
    twin = result.items[0]
    assert twin.properties.reported["temperature"] == 41.5
    assert twin.connection_state == "Connected"
    none = registry_manager.query_iot_hub(
        QuerySpecification(query=f"SELECT * FROM devices WHERE tags.run = '{run}' AND NOT "
                                 f"IS_DEFINED(properties.reported.temperature)"), None, 100)
    assert [t.device_id for t in none.items] == [other]


def test_python_query_errors_are_iot_hub_errors(registry_manager):
    from msrest.exceptions import HttpOperationError
    try:
        registry_manager.query_iot_hub(QuerySpecification(query="SELECT * FROM devices WHERE"), None, 10)
    except HttpOperationError as e:
        assert e.response.status_code == 400
        assert "ArgumentInvalid" in e.response.text and "column 28" in e.response.text, e.response.text
    else:
        raise AssertionError("a query with a syntax error was accepted")


def test_node_registry_query_pages_through_next_as_twin(hub, create_device, registry_manager):
    run = f"q{uuid.uuid4().hex[:8]}"
    devices = _tagged_devices(create_device, registry_manager, 7, run)
    proc = subprocess.Popen(["node", str(NODE_DIR / "query.js"), "pages"], cwd=NODE_DIR,
                            env=_env(hub, SERVICE_CS=hub.owner_connection_string,
                                     QUERY=f"SELECT * FROM devices WHERE tags.run = '{run}'", PAGE_SIZE="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        answer = _line(proc, "Registry.createQuery")
        _finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    pages = answer["pages"]
    assert [len(p) for p in pages] == [3, 3, 1], pages
    assert sorted(d for p in pages for d in p) == sorted(d for _, d in devices)
