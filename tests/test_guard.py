"""The Guard object, its micro-batcher, the HTTP service (through FastAPI's test client)
and the ``filter`` command, on the tiny backdoored model."""

from __future__ import annotations

import asyncio
import io
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trojanscan.exceptions import DataError, DependencyError, ParameterError
from trojanscan.guard import Guard, MicroBatcher, as_inputs

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from trojanscan.serve import create_app, load_npy

#: a fast guard for the serving tests: the paper's settings with fewer overlays,
#: which catch the tiny fixture's corner patch (the default's figures are measured in
#: docs/detectors/filter-results.md, and tests/test_strip_anywhere.py tests its rules)
FAST = {"n_overlays": 16, "blend": "sum_clip", "statistic": "mean",
        "threshold_method": "normal", "sequential": False}


@pytest.fixture(scope="module")
def guard(tiny: Any) -> Guard:
    return Guard.calibrate(tiny.backdoored, tiny.test, detector="strip", frr=0.01, seed=0,
                           device="cpu", **FAST)


@pytest.fixture(scope="module")
def client(guard: Guard) -> Any:
    app = create_app(guard, max_batch=32, max_body_bytes=200_000)
    with TestClient(app) as c:
        yield c


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# Guard and MicroBatcher
# ---------------------------------------------------------------------------


def test_guard_predicts_and_flags(tiny: Any, guard: Guard) -> None:
    trig = tiny.triggered_test()
    res = guard.predict(trig)
    assert res.flagged.mean() >= 0.9
    with torch.no_grad():
        assert np.array_equal(res.predictions, tiny.backdoored(trig).argmax(1).numpy())
    clean = guard.predict(tiny.test.x.numpy())  # numpy arrays are accepted too
    assert clean.flagged.mean() <= 0.05
    d = res.to_dict()
    assert set(d) == {"predictions", "flagged", "scores"} and len(d["flagged"]) == len(trig)
    info = guard.info()
    assert info["detector"] == "strip" and info["input_shape"] == [1, 8, 8]
    assert 0 <= info["frr_measured"] <= 0.05


def test_guard_gives_the_decisions_of_filter(tiny: Any) -> None:
    """Sequential testing included: the guard serves exactly what ``filter`` reports."""
    g = Guard.calibrate(tiny.backdoored, tiny.test, device="cpu", n_overlays=16)
    x = torch.cat([tiny.triggered_test()[:40], tiny.test.x[:40]])
    served = g.predict(x)
    reported = g.detector.filter(x)
    assert np.array_equal(served.flagged, reported.flagged)
    assert np.array_equal(served.predictions, reported.predictions)
    assert np.allclose(served.scores, reported.scores)
    assert served.flagged[:40].mean() >= 0.8 and served.flagged[40:].mean() <= 0.1
    # one input at a time, as concurrent clients send them, the answers do not change
    alone = np.array([bool(g.predict(x[i:i + 1]).flagged[0]) for i in range(0, 80, 8)])
    assert np.array_equal(alone, served.flagged[::8])
    for gone in ("scale_up", "neural_cleanse"):
        with pytest.raises(ParameterError, match="detector"):
            Guard.calibrate(tiny.backdoored, tiny.test, detector=gone)


def test_guard_needs_a_calibrated_detector(tiny: Any) -> None:
    from trojanscan.detectors.strip import Strip

    with pytest.raises(ParameterError, match="not calibrated"):
        Guard(tiny.backdoored, Strip())


def test_micro_batcher_coalesces_without_changing_answers(tiny: Any, guard: Guard) -> None:
    x = tiny.test.x[:40].numpy()
    ref = guard.predict(x)
    batcher = MicroBatcher(guard, max_batch=64, max_wait_ms=50)

    async def many() -> list[Any]:
        return await asyncio.gather(*(batcher.submit(x[i:i + 4]) for i in range(0, 40, 4)))

    try:
        parts = asyncio.run(many())
    finally:
        batcher.close()
    assert batcher.stats.inputs == 40 and batcher.stats.batches < 10  # coalesced
    np.testing.assert_allclose(np.concatenate([p.scores for p in parts]), ref.scores,
                               atol=1e-5)
    assert np.array_equal(np.concatenate([p.predictions for p in parts]), ref.predictions)


def test_as_inputs_validation() -> None:
    shape = (1, 2, 2)
    assert as_inputs([[[[0.0, 1.0], [0.5, 0.25]]]], shape).dtype == np.float32
    for bad, match in [([[[[0.0, 1.0]]]], "shape"), ([], "shape"),
                       (np.zeros((0, 1, 2, 2)), "at least one"),
                       (np.full((1, 1, 2, 2), np.nan), "NaN"),
                       (np.full((1, 1, 2, 2), 2.0), r"\[0, 1\]"),
                       ([[[["a", "b"], ["c", "d"]]]], "numbers"),
                       (np.zeros((9, 1, 2, 2)), "at most 8")]:
        with pytest.raises(DataError, match=match):
            as_inputs(bad, shape, max_batch=8)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


def test_predict_json_and_npy_agree(tiny: Any, client: Any, guard: Guard) -> None:
    x = tiny.triggered_test()[:6].numpy()
    r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"predictions", "flagged", "scores"}
    assert len(body["predictions"]) == 6 and all(isinstance(f, bool) for f in body["flagged"])
    r2 = client.post("/predict", content=_npy(x),
                     headers={"content-type": "application/x-npy"})
    assert r2.status_code == 200, r2.text
    assert r2.json()["predictions"] == body["predictions"]
    np.testing.assert_allclose(r2.json()["scores"], body["scores"], atol=1e-5)
    ref = guard.predict(x)
    assert body["flagged"] == ref.flagged.tolist() and sum(body["flagged"]) >= 5


def test_predict_accepts_float64_fortran_and_int_npy(client: Any) -> None:
    x = np.asfortranarray(np.random.default_rng(0).random((2, 1, 8, 8)))
    r = client.post("/predict", content=_npy(x), headers={"content-type": "application/x-npy"})
    assert r.status_code == 200, r.text
    r = client.post("/predict", content=_npy(np.ones((1, 1, 8, 8), dtype=np.uint8)),
                    headers={"content-type": "application/x-npy; charset=binary"})
    assert r.status_code == 200, r.text


def _forged_npy() -> bytes:
    """A header announcing 10 million inputs followed by the bytes of one."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10_000_000, 1, 8, 8)})
    return buf.getvalue() + np.zeros((1, 1, 8, 8), dtype="<f4").tobytes()


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


GOOD = np.full((1, 1, 8, 8), 0.5).tolist()
JSON = "application/json"
NPY = "application/x-npy"
BAD_BODIES = [
    ("malformed json", b'{"inputs": [[[', JSON, 400, "not valid JSON"),
    ("not utf-8", b"\xff\xfe\x00", JSON, 400, "not valid JSON"),
    ("json without inputs", b'{"x": 1}', JSON, 422, "inputs"),
    ("json list", b"[1, 2]", JSON, 422, "inputs"),
    ("wrong shape", json.dumps({"inputs": np.zeros((2, 1, 5, 5)).tolist()}).encode(), JSON,
     422, "shape"),
    ("three dims", json.dumps({"inputs": np.zeros((1, 8, 8)).tolist()}).encode(), JSON, 422,
     "shape"),
    ("scalar", b'{"inputs": 3}', JSON, 422, "shape"),
    ("ragged", json.dumps({"inputs": [[[[0.1] * 8] * 8], [[[0.1] * 7] * 8]]}).encode(), JSON,
     422, "rectangular|shape"),
    ("strings", json.dumps({"inputs": [[[["a"] * 8] * 8]]}).encode(), JSON, 422, "numbers"),
    ("mixed null", json.dumps({"inputs": [[[[None] + [0.1] * 7] * 8]]}).encode(), JSON, 422,
     "numbers"),
    ("booleans", json.dumps({"inputs": [[[[True] * 8] * 8]]}).encode(), JSON, 422, "boolean"),
    ("nan", b'{"inputs": [[[' + b",".join([b"[" + b",".join([b"NaN"] * 8) + b"]"] * 8)
     + b"]]]}", JSON, 422, "NaN"),
    ("infinity literal", json.dumps({"inputs": [[[[1e999] * 8] * 8]]}).encode(), JSON, 422,
     "NaN or infinite"),
    ("out of range", json.dumps({"inputs": [[[[2.0] * 8] * 8]]}).encode(), JSON, 422,
     r"\[0, 1\]"),
    ("no inputs", b'{"inputs": []}', JSON, 422, "shape"),
    ("too many inputs", json.dumps({"inputs": GOOD * 33}).encode(), JSON, 413, "at most 32"),
    ("too big body", b'{"inputs": [' + b" " * 250_000 + b"]}", JSON, 413, "limit"),
    ("deep nesting", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 413,
     "limit"),
    ("deep nesting small", b'{"inputs": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON, 400,
     "not valid JSON"),
    ("huge integer", b'{"inputs": ' + b"1" * 5000 + b"}", JSON, 400, "not valid JSON"),
    ("text/plain", json.dumps({"inputs": GOOD}).encode(), "text/plain", 415, "Content-Type"),
    ("no content type", json.dumps({"inputs": GOOD}).encode(), "", 415, "Content-Type"),
    ("form", b"inputs=1", "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("npy garbage", b"\x93NUMPY garbage", NPY, 400, r"\.npy"),
    ("npy truncated", _npy(np.zeros((2, 1, 8, 8)))[:-16], NPY, 400, "bytes"),
    ("npy forged shape", _forged_npy(), NPY, 400, "bytes"),
    ("npy object (pickle)", _object_npy(), NPY, 422, "object"),
    ("npy strings", _npy(np.array([["a"]])), NPY, 422, "numbers"),
    ("npy complex", _npy(np.zeros((1, 1, 8, 8), dtype=complex)), NPY, 422, "numbers"),
    ("npy wrong shape", _npy(np.zeros((2, 8, 8), dtype=np.float32)), NPY, 422, "shape"),
    ("npy nan", _npy(np.full((1, 1, 8, 8), np.nan, dtype=np.float32)), NPY, 422, "NaN"),
    ("npy too many", _npy(np.zeros((40, 1, 8, 8), dtype=np.float32)), NPY, 413, "at most"),
    ("json sent as npy", json.dumps({"inputs": GOOD}).encode(), NPY, 400, r"\.npy"),
]


@pytest.mark.parametrize(("what", "body", "ctype", "status", "match"), BAD_BODIES,
                         ids=[b[0] for b in BAD_BODIES])
def test_bad_bodies_get_4xx_with_a_message(client: Any, what: str, body: bytes, ctype: str,
                                           status: int, match: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/predict", content=body, headers=headers)
    assert r.status_code == status, (what, r.status_code, r.text)
    assert re.search(match, r.json()["error"]), r.json()


def test_content_length_lies_and_chunked_bodies(client: Any) -> None:
    r = client.post("/predict", content=b"{}", headers={"content-type": JSON,
                                                        "content-length": "abc"})
    assert 400 <= r.status_code < 500

    def chunks() -> Any:
        for _ in range(30):
            yield b" " * 10_000

    r = client.post("/predict", content=chunks(), headers={"content-type": JSON})
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_other_routes_and_methods_are_4xx(client: Any) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").status_code == 404
    assert "error" in client.get("/nowhere").json()


def test_healthz(client: Any, guard: Guard) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["detector"] == "strip"
    assert body["threshold"] == pytest.approx(guard.threshold)
    assert body["max_batch"] == 32 and body["input_shape"] == [1, 8, 8]


def _parse_prometheus(text: str) -> dict[str, float]:
    """A strict little parser of the text format: ``name{labels} value`` lines."""
    out: dict[str, float] = {}
    line_re = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
                         r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? (\S+)$')
    for line in text.splitlines():
        if not line or line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = line_re.match(line)
        assert m, f"not Prometheus text: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(4))
    return out


def test_metrics_parse_and_count(tiny: Any, guard: Guard) -> None:
    app = create_app(guard, max_batch=32)
    with TestClient(app) as c:
        x = tiny.triggered_test()[:5].numpy()
        assert c.post("/predict", json={"inputs": x.tolist()}).status_code == 200
        assert c.post("/predict", json={"inputs": tiny.test.x[:3].numpy().tolist()}
                      ).status_code == 200
        assert c.post("/predict", content=b"{", headers={"content-type": JSON}
                      ).status_code == 400
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = _parse_prometheus(r.text)
    assert m['trojanscan_requests_total{endpoint="/predict",code="200"}'] == 2
    assert m['trojanscan_requests_total{endpoint="/predict",code="400"}'] == 1
    assert m["trojanscan_inputs_total"] == 8
    flagged = guard.predict(np.concatenate([x, tiny.test.x[:3].numpy()])).flagged.sum()
    assert m["trojanscan_flagged_total"] == flagged >= 5
    assert m["trojanscan_request_latency_seconds_count"] == 3
    buckets = [v for k, v in m.items() if k.startswith("trojanscan_request_latency_seconds_b")]
    assert buckets == sorted(buckets) and buckets[-1] == 3
    assert m["trojanscan_request_latency_seconds_sum"] > 0
    assert math.isfinite(m["trojanscan_threshold"])
    assert "# TYPE trojanscan_request_latency_seconds histogram" in r.text


def test_create_app_settings(guard: Guard) -> None:
    with pytest.raises(ParameterError, match="max_batch"):
        create_app(guard, max_batch=0)
    with pytest.raises(ParameterError, match="max_body_bytes"):
        create_app(guard, max_body_bytes=10)


def test_missing_extra_names_it(guard: Guard, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(DependencyError, match=r"trojanscan\[serve\]"):
        create_app(guard)


def test_load_npy_never_unpickles() -> None:
    from trojanscan.serve import ClientError

    with pytest.raises(ClientError) as err:
        load_npy(_object_npy())
    assert err.value.status == 422


# ---------------------------------------------------------------------------
# the filter command
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("filter")
    model = torch.jit.trace(tiny.backdoored.eval(), tiny.test.x[:2])
    torch.jit.save(model, str(d / "model.pt"))
    np.savez(d / "clean.npz", x=tiny.test.x.numpy())
    np.savez(d / "trig.npz", x=tiny.triggered_test()[:30].numpy())
    return {"model": d / "model.pt", "clean": d / "clean.npz", "trig": d / "trig.npz",
            "dir": d}


def _cli(*args: str) -> int:
    from trojanscan.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return int(exc.value.code or 0)


def _filter(files: dict[str, Path], inputs: Path, out: Path, **options: Any) -> int:
    """The command's own exit code (what the CLI is to pass on)."""
    from trojanscan.commands.filter import run

    kwargs: dict[str, Any] = {"frr": 0.01, "detector": "strip", "seed": 0, "device": "cpu",
                              "arch": None, "trust_pickle": False, "quiet": True,
                              "json_out": False}
    kwargs.update(options)
    return run(model=files["model"], inputs=str(inputs), calibrate=str(files["clean"]),
               out=out, **kwargs)


def test_filter_command_report(files: dict[str, Path], tiny: Any) -> None:
    out = files["dir"] / "rep"
    before = files["trig"].read_bytes()
    code = _filter(files, files["trig"], out)
    assert code == 1
    assert files["trig"].read_bytes() == before  # inputs never modified
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == "filter" and rep["verdict"] == "triggered"
    assert len(rep["flagged"]) == 30 and sum(rep["flagged"]) >= 27
    assert len(rep["predictions"]) == 30 and rep["frr"] == 0.01
    assert 0 <= rep["frr_measured"] <= 0.05 and isinstance(rep["threshold"], float)
    scores = np.load(out / rep["scores_file"], allow_pickle=False)
    assert scores.shape == (30,) and scores.dtype == np.float32
    assert np.array_equal(scores > rep["threshold"], np.array(rep["flagged"]))
    assert {i["role"] for i in rep["inputs"]} == {"model", "inputs", "calibrate"}
    assert "strip" in rep["detectors"] and (out / "report.html").exists()


def test_filter_command_exit_0_on_clean_inputs(files: dict[str, Path], tiny: Any) -> None:
    from trojanscan.detectors.strip import Strip

    det = Strip(seed=0, device="cpu").fit(tiny.backdoored, tiny.test)  # the CLI's defaults
    calm = np.argsort(det.score(tiny.test.x))[:8]
    np.savez(files["dir"] / "calm.npz", x=tiny.test.x[torch.from_numpy(calm)].numpy())
    out = files["dir"] / "rep_clean"
    code = _filter(files, files["dir"] / "calm.npz", out)
    assert code == 0
    assert json.loads((out / "report.json").read_text())["verdict"] == "clean"


def test_filter_command_through_the_cli(files: dict[str, Path]) -> None:
    out = files["dir"] / "rep_cli"
    _cli("filter", str(files["model"]), str(files["trig"]), "--calibrate",
         str(files["clean"]), "--out", str(out), "--device", "cpu", "--quiet",
         "--detector", "strip")
    rep = json.loads((out / "report.json").read_text())
    assert rep["detector"] == "strip" and rep["num_inputs"] == 30
    assert 1 <= rep["detectors"]["strip"]["mean_forwards_per_input"] <= 4 * 32 + 1


def test_filter_command_bad_options(files: dict[str, Path]) -> None:
    args = ["filter", str(files["model"]), str(files["trig"]), "--calibrate",
            str(files["clean"]), "--out", str(files["dir"] / "x"), "--device", "cpu", "-q"]
    assert _cli(*args, "--detector", "neural_cleanse") == 2
    assert _cli(*args, "--frr", "1.5") == 2


def test_filter_detector_parameters_from_the_cli(files: dict[str, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = files["dir"] / "rep_param"
    _cli("filter", str(files["model"]), str(files["trig"]), "--calibrate",
         str(files["clean"]), "--out", str(out), "--device", "cpu", "--quiet",
         "--param", "statistic=median", "--param", "n_overlays=20", "--param", "blend=max")
    params = json.loads((out / "report.json").read_text())["params"]["detector_params"]
    assert (params["statistic"], params["n_overlays"], params["blend"]) == ("median", 20, "max")
    out2 = files["dir"] / "rep_tail"
    _cli("filter", str(files["model"]), str(files["trig"]), "--calibrate",
         str(files["clean"]), "--out", str(out2), "--device", "cpu", "--quiet",
         "--param", "statistic=tail", "--param", "threshold_method=conservative",
         "--param", "blend=sum_clip", "--frr", "0.05")
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["params"]["detector_params"]["statistic"] == "tail"
    assert rep["params"]["detector_params"]["threshold_method"] == "conservative"
    assert rep["detectors"]["strip"]["calibration_warning"] is None
    # too few fit scores for a 90%-sure 1% FRR: said on stderr and in the report
    out3 = files["dir"] / "rep_small"
    capsys.readouterr()
    _cli("filter", str(files["model"]), str(files["trig"]), "--calibrate",
         str(files["clean"]), "--out", str(out3), "--device", "cpu", "--quiet",
         "--param", "threshold_method=conservative", "--param", "holdout_fraction=0.6")
    assert "too few" in capsys.readouterr().err
    warn = json.loads((out3 / "report.json").read_text())["detectors"]["strip"]
    assert "too few" in warn["calibration_warning"]
    args = ["filter", str(files["model"]), str(files["trig"]), "--calibrate",
            str(files["clean"]), "--out", str(files["dir"] / "y"), "--device", "cpu", "-q"]
    capsys.readouterr()
    assert _cli(*args, "--param", "no_such_thing=1") == 2
    err = capsys.readouterr().err
    assert "no_such_thing" in err and "accepted:" in err and "Traceback" not in err
    assert _cli(*args, "--param", "statistic") == 2  # no '='
    assert _cli(*args, "--param", "statistic=mode") == 2  # invalid value, named by STRIP
    assert not (files["dir"] / "y" / "report.json").exists()
