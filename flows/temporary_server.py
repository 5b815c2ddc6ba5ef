"""The temporary Prefect server of one `smpo` command, which dies with the command.

With no PREFECT_API_URL, Prefect starts a server of its own (its "ephemeral" mode,
`prefect.server.api.server.SubprocessASGIServer`) and stops it from an `atexit` hook only: a
command killed by SIGKILL (kill -9, the OOM killer, SMPO_FAULT) left that server running for
good, holding the command's stdout and stderr open, so whoever read them waited forever. So the
command starts that server itself, as a child that the kernel kills when the command dies
(Linux's PR_SET_PDEATHSIG), and points Prefect at it through PREFECT_API_URL.

The command binds the server's listening socket itself and hands it over: its address is known
(and set) before Prefect is imported, with no window in which another process takes the port,
and the server boots while the command checks its plan.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from smpo_core.errors import SmpoError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class TemporaryServer:
    process: subprocess.Popen
    api_url: str

    def wait_until_up(self, timeout: float) -> None:
        """Return once the server answers; a clear error if it died or did not answer."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{self.api_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
            time.sleep(0.2)
        code = self.process.poll()
        state = f"exited with code {code}" if code is not None else f"no answer in {timeout:.0f} s"
        raise SmpoError(f"the temporary Prefect server at {self.api_url} did not start "
                        f"({state}); run `make serve`, or set PREFECT_API_URL to a running "
                        f"Prefect server, and rerun")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def launch() -> TemporaryServer:
    """Start the server (without waiting for it) and point this process's Prefect at it:
    call before Prefect is imported. It is stopped at exit, and killed by the kernel if this
    process dies first (Linux; elsewhere only the normal exit stops it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # What Prefect's ephemeral mode runs: its API without the UI and without the background
    # services a long-lived server needs.
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                        "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    with listener:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.temporary_server", str(listener.fileno()),
             str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL, pass_fds=[listener.fileno()])
    server = TemporaryServer(process, f"http://127.0.0.1:{port}/api")
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


def _serve(fd: int, parent: int) -> None:
    """The server process: die with `parent`, then serve Prefect's API on the socket `fd`."""
    _die_with(parent)
    import uvicorn

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True,
                            log_level="error", lifespan="on")
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


def _die_with(parent: int) -> None:
    """Ask the kernel for SIGKILL when the thread that started this process exits (the
    command's main thread: its whole life)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was armed
        sys.exit(1)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
