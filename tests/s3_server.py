"""A real S3 endpoint on loopback: moto's server mode (``python -m moto.server``) in its own process.

Clients reach it through s3fs/botocore over HTTP exactly as they reach AWS; nothing is mocked inside
the process under test. State lives in the server's memory and goes when it stops.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from kvckpt.cli.local_server import free_port, stop_process, tail_of, wait_until
from tests.harness.base import Throwaway

#: moto accepts any credentials; these keep botocore from looking for real ones.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class MotoServer(Throwaway):
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: str = field(default="", init=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage_options(self) -> dict[str, Any]:
        """s3fs options for this endpoint (what FsspecWriter/FsspecReader and kvckpt take)."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    def environment(self) -> dict[str, str]:
        """The same for a child process (botocore reads AWS_ENDPOINT_URL)."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> MotoServer:
        self.port = self.port or free_port()
        handle, self.log_path = tempfile.mkstemp(prefix="moto-", suffix=".log")
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._answers, 30, f"moto server on port {self.port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; its log:\n{tail_of(self.log_path, 20)}") from None
        return self

    def _answers(self) -> bool:
        assert self.process is not None and self.process.poll() is None, tail_of(self.log_path, 20)
        with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2) as reply:
            return bool(reply.status == 200)

    def create_bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(**self.storage_options()).mkdir(name)
        return f"s3://{name}"

    def cleanup(self) -> None:
        stop_process(self.process)
        if self.log_path:
            os.unlink(self.log_path)
