"""The command line on a fresh install, before the first ``qa-node serve``: one clear line and a
non-zero exit, never a traceback, and nothing created; ``--config`` before or after the subcommand;
``serve`` creates its database's folder; ``qa-node train --help``."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.helpers import qa_node, wait_until, write_config


def _fresh(tmp_path):
    data = tmp_path / "var"  # does not exist yet
    cfg = write_config(tmp_path / "config.toml", data_dir=data)
    return cfg, data / "ctqa.sqlite"


def test_commands_before_the_first_serve_say_so_in_one_line(tmp_path):
    cfg, db = _fresh(tmp_path)
    expected = f"no database at {db}: start `qa-node serve` first"
    for argv in (["--config", str(cfg), "status"], ["status", "--json", "--config", str(cfg)],
                 ["--config", str(cfg), "outbox"], ["outbox", "--config", str(cfg), "--state", "dead"],
                 ["--config", str(cfg), "resend", "--dead"],
                 ["--config", str(cfg), "rebuild-outputs", "--failed"]):
        r = qa_node(*argv, cwd=tmp_path)
        assert r.returncode == 1, (argv, r.stdout, r.stderr)
        assert r.stderr.splitlines() == [f"qa-node: {expected}"], (argv, r.stderr)
        assert r.stdout == ""
    r = subprocess.run([sys.executable, "-c", "import sys; from node.cli import report_main; "
                        "sys.exit(report_main(sys.argv[1:]))", "--config", str(cfg), "--scanner", "CT1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines() == [f"qa-report: {expected}"], r.stderr
    assert not db.exists() and not db.parent.exists()  # nothing was created by looking


def test_serve_creates_the_database_folder_and_takes_config_after_the_subcommand(tmp_path):
    data = tmp_path / "var"
    cfg = write_config(tmp_path / "config.toml", data_dir=data)
    db = tmp_path / "state" / "db" / "ctqa.sqlite"  # outside data_dir, folder absent
    cfg.write_text(cfg.read_text().replace(f'database = "sqlite:///{data}/ctqa.sqlite"', f'database = "sqlite:///{db}"'))
    port_file = tmp_path / "port"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "node", "serve", "--config", str(cfg), "--port-file",
                                 str(port_file), "--min-free-mb", "0"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None,
                       timeout=60, what="serve to start")
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert db.is_file()
            r = qa_node("status", "--config", str(cfg), cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines()[1:4] == ["jobs: none", "outputs: none",
                                                  "instance conflicts (same UID, different bytes): 0"]
        finally:
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            while proc.poll() is None and time.monotonic() - t0 < 30:
                time.sleep(0.1)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_train_help(tmp_path):
    from node.cli import TRAINERS

    names = sorted(TRAINERS)
    assert {"n2q", "d2iqa"} <= set(names)
    r = qa_node("train", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: qa-node train {{{','.join(names)}}} [options]")
    assert f"one of {', '.join(names)}" in r.stdout
    r = qa_node("train", "n2q", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: qa-node train n2q") and "--out FILE" in r.stdout
    r = qa_node("train", "resnet", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"qa-node: unknown model 'resnet' to train; choose one of {', '.join(names)}"
