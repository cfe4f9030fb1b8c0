"""`visrec serve` takes its address before it loads anything: an address it cannot listen on (a port in use, an
address this machine lacks, a host name that does not resolve) is one `error:` line naming it, exit 2, with no
model loaded and no gallery created; port 0 serves on a port the system picks, and says which."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs visrec[serve]")
pytest.importorskip("uvicorn", reason="the service needs visrec[serve]")
import httpx  # noqa: E402

from conftest import cli_status, wait_healthy  # noqa: E402

KEY = "k" * 32  # off loopback an API key is required before the address is even tried


def config(tmp_path, model, host="127.0.0.1", port=0):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"host: {host}\nport: {port}\napi_keys: [{KEY}]\nfaces:\n  model: {model}\n  aligned: true\n"
                   f"  gallery: {{backend: faiss, path: {tmp_path / 'gallery'}}}\n")
    return cfg


def visrec_serve(cfg, monkeypatch, capsys):
    """``visrec serve --config CFG`` in this process, failing if it loads a model: (exit status, stderr)."""
    import visrec.serve.app as app

    def loaded(*args, **kwargs):
        raise AssertionError("the service loaded its models before it had an address")

    monkeypatch.setattr(app, "create_app", loaded)
    code, err = cli_status(["serve", "--config", str(cfg)], monkeypatch, capsys)
    return code, " ".join(err.split())


def test_a_port_in_use_is_said_before_anything_loads(tiny_face_model, tmp_path, monkeypatch, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = visrec_serve(config(tmp_path, tiny_face_model, port=port), monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use;"), err
    assert "--set port=N" in err and "Traceback" not in err
    assert not (tmp_path / "gallery").exists()  # the gallery was not even opened


@pytest.mark.parametrize("host, said", [
    ("192.0.2.1", "Cannot assign requested address; no network interface of this machine has that address"),
    ("no-such-host.invalid", "the host name does not resolve on this machine"),
])
def test_an_address_this_machine_cannot_listen_on_is_named(host, said, tiny_face_model, tmp_path, monkeypatch,
                                                           capsys):
    code, err = visrec_serve(config(tmp_path, tiny_face_model, host=host), monkeypatch, capsys)
    assert code == 2, err
    assert err.startswith(f"error: cannot listen on {host}:0: {said}"), err
    assert "--set host=" in err and not (tmp_path / "gallery").exists()


def test_port_0_serves_on_the_port_the_system_picked_and_says_which(tiny_face_model, tmp_path):
    cfg = config(tmp_path, tiny_face_model)
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "visrec.cli", "serve", "--config", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "COLUMNS": "1000"})
    try:
        for _ in range(1200):  # the announcement comes once the model has loaded
            found = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", (tmp_path / "server.log").read_text())
            if found or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert found, (tmp_path / "server.log").read_text()
        port = int(found.group(1))
        assert port != 0
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        status = httpx.get(f"http://127.0.0.1:{port}/v1/status", headers={"X-API-Key": KEY}, timeout=10)
        assert status.status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    # uvicorn shuts down on SIGTERM, then ends by the same signal (its cooperative signal handling, since 0.29:
    # pyproject's floor)
    assert proc.returncode == -15 and "Finished server process" in (tmp_path / "server.log").read_text()


def test_the_announced_url_writes_an_ipv6_address_in_brackets():
    from visrec.serve.app import server_url

    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert server_url("localhost", 0) == "http://localhost:0"
    assert server_url("::1", 8080) == "http://[::1]:8080"


def test_the_address_is_held_from_the_start_so_a_second_server_loading_meanwhile_is_refused():
    """SO_REUSEADDR (set so a restarted server takes its port back) lets two sockets bind one port while
    neither listens: the first server listens at once, before its models load, so the second fails at its
    start with the same error, not later inside uvicorn."""
    from visrec.errors import ConfigError
    from visrec.serve.app import listening_socket

    first = listening_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            listening_socket("127.0.0.1", port).close()
    finally:
        first.close()
    listening_socket("127.0.0.1", port).close()  # and once the first is gone, the port is free again
