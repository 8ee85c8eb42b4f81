"""The caption stage's openai backend against real OpenAI-compatible servers
(tests/openai_server.py: the tiny Gemma 3 behind FastAPI + uvicorn, in its own
process, so it can be SIGKILLed mid-stage like a crashed vLLM)."""
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.encoders.gemma import build_tiny_gemma3
from models.encoders.openai_chat import EndpointsDown
from models.hub import SetupError
from tasks.bucket import BucketParams
from tasks.caption import FLAG_MAX_TOKENS, STORE, VERSION, CaptionParams, _generation_params, caption
from tasks.core.params import ParamsError, from_dict
from tasks.core.store import item_key
from tests.conftest import bucketed_sample
from tests.openai_server import Served, free_port
from tests.storekit import item_bytes, replace_item, store_of

SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))
MANIFEST = Path("data/manifest/caption.parquet")
SERVED_ID = "tiny/gemma-3"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The live server most tests use, and two that die mid-stage (SIGKILL on their
    2nd / 3rd chat request), started together: each start loads torch and the model."""
    tmp = tmp_path_factory.mktemp("openai")
    model = build_tiny_gemma3(tmp / "gemma3")
    procs = {"live": Served(model, SERVED_ID, tmp / "live.log"),
             "dies_after_1": Served(model, SERVED_ID, tmp / "dies1.log", die_after=1),
             "dies_after_2": Served(model, SERVED_ID, tmp / "dies2.log", die_after=2)}
    try:
        with ThreadPoolExecutor(len(procs)) as ex:
            list(ex.map(Served.wait_ready, procs.values()))
        yield procs
    finally:
        for s in procs.values():
            s.stop()


@pytest.fixture
def server(servers) -> Served:
    """The live server, reset: the id it serves, no faults, counters at zero."""
    s = servers["live"]
    s.control(model_id=SERVED_ID, fail_first=0, fail_every=0, received=0, answered=0, bodies=[])
    return s


@pytest.fixture
def bucketed(chdir):
    bucketed_sample(SMALL, figures=4)
    return chdir


def _closed() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connections are refused


def _params(*endpoints: str, **kw) -> CaptionParams:
    return CaptionParams(**{"backend": "openai", "openai_endpoints": endpoints, "openai_model": SERVED_ID,
                            "max_new_tokens": 8, "retries": 2, "backoff_s": 0.01, "timeout_s": 30.0,
                            "openai_max_in_flight": 2, **kw})


def _rows() -> list[dict]:
    return pq.read_table(MANIFEST).to_pylist()


def _stored() -> set[str]:
    return store_of(STORE).keys()


@pytest.mark.slow
def test_captions_come_through_the_server_keyed_by_the_served_model(bucketed, server):
    p = _params(server.url)
    report = caption(p, workers=2)
    assert report.computed == 4 and report.failed == 0
    buckets = {r["id"]: r for r in pq.read_table("data/manifest/bucket.parquet").to_pylist()}
    rows = _rows()
    for r in rows:
        raw = json.loads(item_bytes(STORE, r["key"]))
        # Random weights never end on their own: finish_reason "length" -> flagged, 8 tokens.
        assert raw["tokens"] == 8 and raw["ended"] is False and r["flags"] == [FLAG_MAX_TOKENS]
        assert r["error"] is None and len(r["text"].split()) >= 4
        assert r["key"] == item_key("caption", VERSION, [buckets[r["id"]]["key"]], _generation_params(p),
                                    model=f"openai:{SERVED_ID}")
    assert len({r["text"] for r in rows}) > 1  # each image reaches the model
    bodies = server.stats()["bodies"]
    assert {b["image_sha256"] for b in bodies} == {
        hashlib.sha256(item_bytes("data/derived/bucket", b["key"])).hexdigest() for b in buckets.values()}
    # Greedy: no sampling knobs sent.
    assert all(b["prompt"] == p.instruction and b["max_tokens"] == 8 and b["temperature"] == 0
               and not {"top_p", "top_k", "seed"} & set(b) for b in bodies)

    # Endpoints and in-flight limits are not in the key: nothing is asked of anyone.
    again = caption(_params(_closed(), openai_max_in_flight=5), workers=2)
    assert again.computed == 0 and again.reused == 4 and server.stats()["received"] == 4

    sampled = caption(_params(server.url, temperature=0.7, top_p=0.9, top_k=5, seed=3), workers=2)
    assert sampled.computed == 4
    last = server.stats()["bodies"][-1]
    assert (last["temperature"], last["top_p"], last["top_k"], last["seed"]) == (0.7, 0.9, 5, 3)


@pytest.mark.slow
def test_a_server_of_another_model_is_refused_then_its_captions_get_new_keys(bucketed, server):
    first = caption(_params(server.url), workers=2)
    assert first.computed == 4
    before, stored, old = MANIFEST.read_bytes(), _stored(), {r["id"]: r for r in _rows()}
    bucket_table = Path("data/manifest/bucket.parquet").read_bytes()

    server.control(model_id="tiny/gemma-3-v2")  # the server restarted with another model
    received = server.stats()["received"]
    with pytest.raises(SetupError, match=rf"{server.url} serves 'tiny/gemma-3-v2', but caption\.openai_model "
                                         rf"expects 'tiny/gemma-3'"):
        caption(_params(server.url, max_new_tokens=9), workers=2)  # something is missing: it checks
    assert MANIFEST.read_bytes() == before and _stored() == stored
    assert server.stats()["received"] == received  # no caption was asked for

    moved = caption(_params(server.url, openai_model="tiny/gemma-3-v2"), workers=2)
    assert moved.computed == 4 and moved.reused == 0
    new = _rows()
    assert not {r["key"] for r in new} & {r["key"] for r in old.values()}
    assert all(r["text"] == old[r["id"]]["text"] for r in new)  # same weights behind the new id
    assert _stored() > stored  # the old model's captions stay for a switch back
    assert Path("data/manifest/bucket.parquet").read_bytes() == bucket_table


@pytest.mark.slow
def test_500s_are_retried_and_a_4xx_fails_its_item_only(bucketed, server):
    server.control(fail_first=2)  # one item may meet both: retries=2 still gets it through
    report = caption(_params(server.url), workers=2)
    assert report.computed == 4 and report.failed == 0
    assert server.stats()["received"] == 6 and server.stats()["answered"] == 4

    # A damaged image: the server answers 400, which no retry or other server fixes.
    row = _rows()[0]
    buckets = {r["id"]: r for r in pq.read_table("data/manifest/bucket.parquet").to_pylist()}
    replace_item("data/derived/bucket", buckets[row["id"]]["key"], b"not a png")
    received = server.stats()["received"]
    report = caption(_params(server.url, max_new_tokens=6), workers=2)
    assert report.computed == 3 and report.failed == 1
    assert "HTTP 400" in report.failures[row["id"]] and server.url in report.failures[row["id"]]
    assert server.stats()["received"] == received + 4  # the 400 was not retried


@pytest.mark.slow
def test_a_server_killed_mid_stage_hands_its_work_to_the_other(bucketed, servers, server, caplog):
    victim = servers["dies_after_1"]
    caplog.set_level(logging.WARNING, logger="niche.caption")
    report = caption(_params(victim.url, server.url, openai_max_in_flight=1), workers=2)
    assert victim.proc.poll() is not None  # it did die (SIGKILL), mid-stage
    assert report.computed == 4 and report.failed == 0
    # One caption came from the victim before it died; every other one from the live server,
    # the one whose request killed it included.
    assert server.stats()["answered"] == 3
    assert f"{victim.url} is down" in caplog.text and "1 of 2 endpoints left" in caplog.text


@pytest.mark.slow
def test_all_servers_dead_stops_the_stage_and_keeps_what_arrived(bucketed, servers, server, caplog):
    victim, never = servers["dies_after_2"], _closed()
    caplog.set_level(logging.WARNING, logger="niche.caption")
    with pytest.raises(EndpointsDown, match=rf"{never}.*{victim.url}.*kept; run the stage again"):
        caption(_params(never, victim.url, openai_max_in_flight=1), workers=2)
    assert f"skipping {never}" in caplog.text  # down at the start: skipped, not fatal
    assert len(_stored()) == 2  # the two captions it sent before dying
    assert not MANIFEST.exists()

    report = caption(_params(server.url), workers=2)
    assert report.computed == 2 and report.reused == 2
    assert server.stats()["received"] == 2  # only the rest was asked for


def test_no_endpoint_answering_at_the_start_is_one_error_naming_them(bucketed):
    a, b = _closed(), _closed()
    with pytest.raises(EndpointsDown, match=rf"no OpenAI-compatible endpoint answers: {a} .*; {b} "):
        caption(_params(a, b), workers=2)
    assert not Path(STORE).exists() and not MANIFEST.exists()


@pytest.mark.parametrize("raw, key", [
    ({"openai_endpoints": ["localhost:8000/v1"]}, "caption.openai_endpoints"),
    ({"openai_endpoints": []}, "caption.openai_endpoints"),
    ({"openai_endpoints": ["http://a/v1", "http://a/v1"]}, "caption.openai_endpoints"),
    ({"openai_endpoints": "http://a/v1"}, "caption.openai_endpoints"),
    ({"openai_max_in_flight": 0}, "caption.openai_max_in_flight"),
    ({"openai_model": ""}, "caption.openai_model"),
])
def test_bad_openai_parameters_are_refused_by_name(raw, key):
    with pytest.raises((ParamsError, ValueError), match=key.replace(".", r"\.")):
        from_dict(CaptionParams, {"backend": "openai", **raw}, "caption")
