"""A dead or sick tracking server fails a run in seconds, naming it; two fresh runs share one sqlite store."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def black_hole():
    """A port that accepts connections and never answers (a hung server or a firewall that swallows)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


@pytest.fixture
def sick_server():
    """A server that answers every request with HTTP 503."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_a_black_holed_tracking_server_fails_within_the_deadline(black_hole):
    from tasks.tracking import TrackingUnavailableError, check_tracking_uri

    started = time.time()
    with pytest.raises(TrackingUnavailableError, match="is unreachable .*timed out") as err:
        check_tracking_uri(black_hole, timeout=2)
    assert time.time() - started < 6
    assert black_hole in str(err.value) and "tracking.enabled=false" in str(err.value)


def test_a_tracking_server_answering_503_is_refused_naming_the_status(sick_server):
    from tasks.tracking import TrackingUnavailableError, check_tracking_uri

    with pytest.raises(TrackingUnavailableError, match="unhealthy: GET /health answered HTTP 503"):
        check_tracking_uri(sick_server, timeout=2)


def test_mlflow_http_retries_are_bounded_by_the_environment_defaults():
    """The one retry layer is MLflow's own, bounded: ~10 s a request, 2 retries (not 120 s x 7)."""
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    import lancet_core.runtime_env  # noqa: F401  (applied on import)

    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() <= 10 and MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 2


_FRESH_RUN = """
import sys
from lancet_core.config import LancetConfig
from tasks.tracking import end_run, start_parent_run
cfg = LancetConfig.model_validate({"name": "race", "output_dir": sys.argv[2],
                                   "tracking": {"tracking_uri": "sqlite:///" + sys.argv[1]}})
run = start_parent_run(cfg, "race")
end_run(cfg, run)
print("ok", run)
"""


def test_two_runs_starting_together_on_a_fresh_sqlite_store_both_finish(tmp_path):
    db = tmp_path / "fresh.db"
    procs = [subprocess.Popen([sys.executable, "-c", _FRESH_RUN, str(db), str(tmp_path / f"out{i}")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.startswith("ok "), err[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 2
