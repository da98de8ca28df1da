"""The fastetcd command: flags, environment, errors, logging, and a real start/stop cycle with etcdctl."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import socket
from pathlib import Path

import pytest

import fastetcd
from fastetcd.cli import parse_config
from fastetcd.config import Config, ConfigError, GiB, parse_duration, parse_url
from fastetcd.log import setup_logging
from fastetcd.testing import (
    ServerProcess,
    free_port,
    run_etcdctl,
    run_fastetcd,
    start_fastetcd,
)

# ----------------------------------------------------------------------------- config values


def test_defaults_are_etcds():
    c = Config()
    assert c.name == "default" and c.data_dir == "default.etcd"
    assert c.listen_client_urls == ["http://localhost:2379"]
    assert c.advertise_client_urls == ["http://localhost:2379"]
    assert c.listen_metrics_urls == []
    assert (c.max_request_bytes, c.max_txn_ops, c.snapshot_count) == (1572864, 128, 100000)
    assert c.quota_backend_bytes == 2 * GiB
    assert (c.log_level, c.store, c.auto_compaction_mode, c.auto_compaction_retention) == (
        "info",
        "embedded",
        "periodic",
        "0",
    )
    assert c.experimental_watch_progress_notify_interval == 600.0
    assert c.max_concurrent_streams == 2**32 - 1  # etcd's math.MaxUint32: no limit
    assert Config(name="n1").data_dir == "n1.etcd"
    assert Config(quota_backend_bytes=0).quota_backend_bytes == 2 * GiB
    assert Config(quota_backend_bytes=-1).quota_backend_bytes == -1  # etcd: negative disables the quota


def test_cosmos_key_never_shown():
    c = Config(cosmos_key="s3cr3t-key", cosmos_endpoint="https://acct.documents.azure.com:443/")
    assert "s3cr3t" not in repr(c)
    assert "s3cr3t" not in str(c.log_fields())
    assert c.log_fields()["cosmos-key"] == "(set)"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("10m", 600.0), ("100ms", 0.1), ("1h30m", 5400.0), ("1.5s", 1.5), ("250us", 250e-6),
     ("2\u00b5s", 2e-6), ("3ns", 3e-9), ("-1s", -1.0)],
)
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "error"),
    [("10", 'time: missing unit in duration "10"'), ("1x", 'time: unknown unit "x" in duration "1x"'),
     ("", 'time: invalid duration ""'), ("m", 'time: invalid duration "m"'), ("1..5s", "invalid duration")],
)
def test_bad_go_durations(text, error):
    with pytest.raises(ConfigError, match=re.escape(error)):
        parse_duration(text)


def test_urls_parse_like_etcd():
    u = parse_url("http://127.0.0.1:2379")
    assert (u.scheme, u.host, u.port, u.address) == ("http", "127.0.0.1", 2379, "127.0.0.1:2379")
    assert parse_url("http://[::1]:0").address == "[::1]:0"
    assert parse_url("http://:2379").address == "[::]:2379"
    assert parse_url("http://localhost:2379").host == "localhost"
    assert parse_url("https://127.0.0.1:2379").scheme == "https"
    for raw, msg in [
        ("http://127.0.0.1", 'URL address does not have the form "host:port"'),
        ("ftp://127.0.0.1:1", "URL scheme must be http, https, unix, or unixs"),
        ("http://127.0.0.1:1/x", "URL must not contain a path"),
        ("127.0.0.1:2379", "URL scheme must be"),
        ("http://127.0.0.1:99999", 'URL address does not have the form "host:port"'),
        ("unixs://127.0.0.1:2379", "not supported yet"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(msg)):
            parse_url(raw)


def test_auto_compaction_retention():
    assert Config(auto_compaction_retention="1").auto_compaction_period == 3600.0  # bare number = hours
    assert Config(auto_compaction_retention="5m").auto_compaction_period == 300.0
    assert Config(auto_compaction_retention="5m").auto_compaction_revisions == 0
    c = Config(auto_compaction_mode="revision", auto_compaction_retention="1000")
    assert (c.auto_compaction_revisions, c.auto_compaction_period) == (1000, 0.0)
    with pytest.raises(ConfigError, match="CompactionRetention"):
        Config(auto_compaction_retention="1x")
    with pytest.raises(ConfigError, match="CompactionRetention"):
        Config(auto_compaction_mode="revision", auto_compaction_retention="5m")
    with pytest.raises(ConfigError, match='unknown auto-compaction-mode "foo"'):
        Config(auto_compaction_mode="foo")


# ----------------------------------------------------------------------------- flags and environment


def test_flags_map_to_config():
    c, warnings = parse_config(
        [
            "--name", "n1",
            "--listen-client-urls", "http://127.0.0.1:1,http://127.0.0.1:2",
            "--advertise-client-urls=http://10.0.0.1:1",
            "--listen-metrics-urls", "http://127.0.0.1:3",
            "--max-request-bytes", "100",
            "--max-txn-ops", "7",
            "--quota-backend-bytes", "1024",
            "--snapshot-count", "50",
            "--log-level", "debug",
            "--auto-compaction-mode", "revision",
            "--auto-compaction-retention", "10",
            "--experimental-watch-progress-notify-interval", "100ms",
            "--store", "embedded",
            "--max-concurrent-streams", "100",
            "--handshake-timeout", "3s",
        ],
        {},
    )
    assert warnings == []
    assert c.name == "n1" and c.data_dir == "n1.etcd"
    assert c.listen_client_urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert [u.port for u in c.client_urls] == [1, 2]
    assert c.advertise_client_urls == ["http://10.0.0.1:1"]
    assert [u.address for u in c.metrics_urls] == ["127.0.0.1:3"]
    assert (c.max_request_bytes, c.max_txn_ops, c.quota_backend_bytes, c.snapshot_count) == (100, 7, 1024, 50)
    assert c.log_level == "debug"
    assert c.auto_compaction_revisions == 10
    assert c.experimental_watch_progress_notify_interval == pytest.approx(0.1)
    assert (c.max_concurrent_streams, c.handshake_timeout) == (100, 3.0)


def test_env_vars_apply_and_flags_win():
    env = {
        "FASTETCD_DATA_DIR": "/tmp/from-env",
        "FASTETCD_MAX_TXN_OPS": "9",
        "FASTETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL": "2s",
        "FASTETCD_COSMOS_KEY": "k",
        "FASTETCD_NO_SUCH_SETTING": "1",
    }
    c, warnings = parse_config(["--max-txn-ops", "3"], env)
    assert c.data_dir == "/tmp/from-env"
    assert c.max_txn_ops == 3
    assert c.experimental_watch_progress_notify_interval == 2.0
    assert c.cosmos_key == "k"
    assert any("FASTETCD_MAX_TXN_OPS" in w and "shadowed" in w for w in warnings)
    assert any("FASTETCD_NO_SUCH_SETTING" in w for w in warnings)


def test_listen_without_advertise_is_refused_like_etcd():
    with pytest.raises(ConfigError, match="--advertise-client-urls is required"):
        parse_config(["--listen-client-urls", "http://127.0.0.1:1"], {})
    with pytest.raises(ConfigError, match="--advertise-client-urls is required"):
        parse_config([], {"FASTETCD_LISTEN_CLIENT_URLS": "http://127.0.0.1:1"})


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["--max-txn-ops", "abc"], {}, 'invalid value "abc" for flag --max-txn-ops'),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        (["--data"], {}, "unrecognized arguments: --data"),  # no abbreviations, as in etcd
        (["--max-txn-ops"], {}, "expected one argument"),
        (["--max-txn-ops", "0"], {}, "--max-txn-ops must be positive"),
        (["--log-level", "loud"], {}, "--log-level"),
        (["--store", "redis"], {}, "--store"),
        (["--transport", "h3"], {}, "--transport"),
        (["--experimental-watch-progress-notify-interval", "10"], {}, "missing unit"),
        ([], {"FASTETCD_MAX_REQUEST_BYTES": "x"}, "environment variable FASTETCD_MAX_REQUEST_BYTES"),
        (["--listen-client-urls", "http://h", "--advertise-client-urls", "http://h:1"], {}, "host:port"),
        (["--store", "cosmos"], {}, "--cosmos-endpoint"),
        (["--max-concurrent-streams", "0"], {}, "--max-concurrent-streams must be in 1..4294967295"),
        (["--handshake-timeout", "-1s"], {}, "--handshake-timeout"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, env, needle):
    r = run_fastetcd(*args, env=env)
    assert r.returncode == 2, r
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("fastetcd: error: ")
    assert needle in lines[0]


def test_bad_secret_value_is_not_echoed():
    # The key has no syntax to get wrong today; make sure a future parse error would not leak it.
    with pytest.raises(ConfigError) as info:
        parse_config(["--cosmos-key", "s3cr3t", "--max-txn-ops", "x"], {})
    assert "s3cr3t" not in str(info.value)


def test_help_lists_every_flag_with_env_and_default():
    r = run_fastetcd("--help")
    assert r.returncode == 0
    out = " ".join(r.stdout.split())  # argparse wraps lines
    for flag in [
        "--name", "--data-dir", "--listen-client-urls", "--advertise-client-urls", "--listen-metrics-urls",
        "--max-request-bytes", "--max-txn-ops", "--quota-backend-bytes", "--snapshot-count", "--log-level",
        "--auto-compaction-mode", "--auto-compaction-retention",
        "--experimental-watch-progress-notify-interval", "--store", "--cosmos-endpoint", "--cosmos-key",
        "--cosmos-database", "--cosmos-container", "--transport", "--version",
    ]:
        assert flag in out, flag
    assert "FASTETCD_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL" in out
    assert "[default: '${name}.etcd'; env FASTETCD_DATA_DIR]" in out
    assert "[default: '10m';" in out


def test_version():
    r = run_fastetcd("--version")
    assert r.returncode == 0
    # From git tags through setuptools-scm: X.Y.Z on a tag, a PEP 440 dev version between tags.
    m = re.search(r"^fastetcd Version: (\S+)$", r.stdout, re.M)
    assert m and re.fullmatch(r"\d+\.\d+(\.\d+)?(\.dev\d+)?(\+[\w.]+)?", m.group(1)), r.stdout
    assert m.group(1) == fastetcd.__version__ != "0+unknown"
    assert re.search(r"^Git SHA: ([0-9a-f]{7,}|N/A)$", r.stdout, re.M), r.stdout
    assert re.search(r"^etcd API Version: 3\.5\.\d+$", r.stdout, re.M)


# ----------------------------------------------------------------------------- log format


def test_log_lines_are_zap_shaped_json():
    buf = io.StringIO()
    setup_logging("info", buf)
    try:
        log = logging.getLogger("fastetcd.test")
        log.debug("hidden at info")
        log.info("hello %s", "world", extra={"data-dir": "x.etcd", "n": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            log.error("failed", exc_info=True)
        log.warning("careful")
    finally:
        setup_logging("info")  # back to stderr for the rest of the session
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert [(r["level"], r["msg"]) for r in lines] == [
        ("info", "hello world"),
        ("error", "failed"),
        ("warn", "careful"),
    ]
    first = lines[0]
    assert list(first)[:4] == ["level", "ts", "caller", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert re.fullmatch(r"tests/test_cli\.py:\d+", first["caller"])
    assert first["data-dir"] == "x.etcd" and first["n"] == 3
    assert lines[1]["error"] == "boom" and "ValueError" in lines[1]["stacktrace"]


# ----------------------------------------------------------------------------- the real server
# These run the whole server (fastetcd.app.serve) and talk to it with etcdctl.


def etcdctl(server: ServerProcess, *args: str) -> tuple[int, str, str]:
    return run_etcdctl(server.endpoint, ["--dial-timeout=2s", "--command-timeout=5s", *args], timeout=30)


def serve(workdir: Path, *extra: str, port: int | None = None, wait: bool = True) -> ServerProcess:
    """fastetcd in `workdir` with only the flags given (so etcd's defaults apply: {name}.etcd there)."""
    return start_fastetcd(workdir, extra, port=port, explicit_data_dir=False, wait=wait)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_put_stop_restart_keeps_data(tmp_path, sig):
    port = free_port()
    s = serve(tmp_path, "--name", "n1", port=port)
    try:
        assert etcdctl(s, "put", "foo", "bar")[1].strip() == "OK"
        code = s.stop(sig, timeout=30)
        err = s.output()
    finally:
        s.kill()
    assert code == 0, err
    logs = [json.loads(line) for line in err.splitlines()]  # every line it writes is a JSON log line
    assert {"level", "ts", "caller", "msg"} <= set(logs[0])
    assert (tmp_path / "n1.etcd").is_dir()  # etcd's default data dir: {name}.etcd in the working dir

    s = serve(tmp_path, "--name", "n1", port=port)
    try:
        got = etcdctl(s, "get", "foo", "--print-value-only")
        assert got[1].strip() == "bar"
        code = s.stop(timeout=30)
        err = s.output()
    finally:
        s.kill()
    assert code == 0, err


def _last_line_error(err: str) -> str:
    lines = err.splitlines()
    assert lines, "no output"
    for line in lines[:-1]:
        json.loads(line)  # only the final line is plain text
    assert lines[-1].startswith("fastetcd: error: "), err
    return lines[-1]


def _exit_code_and_output(s: ServerProcess) -> tuple[int, str]:
    """For a server that is expected to exit by itself."""
    try:
        code = s.proc.wait(timeout=60)
    finally:
        s.kill()
    return code, s.output()


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        code, err = _exit_code_and_output(serve(tmp_path, port=holder.getsockname()[1], wait=False))
    assert code == 1
    _last_line_error(err)


def test_data_dir_in_use_exits_1_with_one_line(tmp_path):
    shared = str(tmp_path / "shared")
    first = serve(tmp_path / "first", "--data-dir", shared)
    try:
        code, err = _exit_code_and_output(serve(tmp_path / "second", "--data-dir", shared, wait=False))
        assert code == 1
        assert "in use by another process" in _last_line_error(err)
        code = first.stop(timeout=30)
        assert code == 0, first.output()
    finally:
        first.kill()


def test_tls_flags() -> None:
    """etcd's client TLS flags: spelling, boolean forms (a bare flag is true), environment variables."""
    url = ["--listen-client-urls", "https://127.0.0.1:2379", "--advertise-client-urls", "https://127.0.0.1:2379"]
    c, _ = parse_config([*url, "--cert-file", "s.pem", "--key-file", "k.pem", "--client-cert-auth",
                         "--trusted-ca-file", "ca.pem", "--cipher-suites",
                         "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                         "--tls-max-version", "TLS1.3"], {})
    assert (c.cert_file, c.key_file, c.trusted_ca_file) == ("s.pem", "k.pem", "ca.pem")
    assert c.client_cert_auth is True
    assert c.cipher_suites == ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                               "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]
    assert (c.tls_min_version, c.tls_max_version) == ("TLS1.2", "TLS1.3")
    c, _ = parse_config([*url, "--auto-tls=true", "--client-cert-auth=false"], {})
    assert (c.auto_tls, c.client_cert_auth) == (True, False)
    env = {"FASTETCD_AUTO_TLS": "1", "FASTETCD_CLIENT_CERT_AUTH": "t", "FASTETCD_TLS_MIN_VERSION": "TLS1.3",
           "FASTETCD_TRANSPORT": "native"}
    c, _ = parse_config(url, env)
    assert (c.auto_tls, c.client_cert_auth, c.tls_min_version) == (True, True, "TLS1.3")
    with pytest.raises(ConfigError, match="not a boolean"):
        parse_config([*url, "--auto-tls=yes"], {})
    with pytest.raises(ConfigError, match="must be given together"):
        Config(cert_file="s.pem")
    with pytest.raises(ConfigError, match="must be provided for metrics url https://127.0.0.1:2381"):
        Config(listen_metrics_urls=["https://127.0.0.1:2381"])
    with pytest.raises(ConfigError, match=r"min version \(TLS1.3\) is greater than max version \(TLS1.2\)"):
        Config(tls_min_version="TLS1.3", tls_max_version="TLS1.2", transport="native")


def test_readme_flag_table_lists_every_flag() -> None:
    """The README's flag table is the user's reference: every flag, with its environment variable."""
    from fastetcd.cli import _OPTIONS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [opt.flag for opt in _OPTIONS if f"| `--{opt.flag}` | `{opt.env}` |" not in readme]
    assert not missing, f"README.md's flag table lacks {missing}"
