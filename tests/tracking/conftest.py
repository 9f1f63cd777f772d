"""A real ``mlflow server`` (sqlite store, local artifact root) on a free port of 127.0.0.1.

Started in its own process group (the CLI runs uvicorn as a child) and stopped by that
group: SIGTERM, then SIGKILL for whatever is left. Ready when /health answers "OK".
The job-execution workers MLflow 3 starts beside the server (huey consumers, several
processes) are switched off: tracking needs none of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed_helpers import free_port

# every process these tests start: no usage telemetry, no server-side job workers
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
START_TIMEOUT_S = 120


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    """Poll ``condition`` until it returns something truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # polling interval, not a stand-in for synchronisation


@dataclass
class MlflowServer:
    folder: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200 and response.read().strip() == b"OK"
        except (urllib.error.URLError, OSError):
            return False

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group: ``sig`` first (SIGKILL: a crash), SIGKILL after 20 s."""
        if self._group_alive():
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            wait_until(lambda: not self._group_alive(), 20, "the mlflow server's processes to exit")
        except AssertionError:
            os.killpg(self.process.pid, signal.SIGKILL)
            wait_until(lambda: not self._group_alive(), 20, "the mlflow server's processes to die")
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)


def start_server(folder: Path, port: int | None = None) -> MlflowServer:
    """``mlflow server`` over ``folder/mlflow.db`` and ``folder/artifacts``; returns once healthy."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--default-artifact-root", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(folder / "server.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **QUIET})
    log.close()
    server = MlflowServer(folder, port, process)
    try:
        wait_until(lambda: server.healthy() or process.poll() is not None, START_TIMEOUT_S,
                   f"mlflow server on port {port} to answer /health")
        if process.poll() is not None:
            tail = (folder / "server.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"mlflow server exited with status {process.returncode}:\n{tail}")
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _quiet_mlflow(monkeypatch):
    for name, value in QUIET.items():
        monkeypatch.setenv(name, value)
