"""A local S3 endpoint (moto's server) on 127.0.0.1, for the specs and the object-storage measurement.

It enforces credentials like S3 does: a user with an access key and an S3 policy is created, the bucket too,
then authentication is switched on, so wrong keys get ``InvalidAccessKeyId`` / ``SignatureDoesNotMatch``.
Needs ``moto[server]`` (the ``test`` extra). The connection it offers is exactly the user's path:
``AIRFLOW_CONN_AWS_DEFAULT`` as JSON with ``extra.endpoint_url``.

    python -m pipeline.local_s3 CORPUS_DIR [--json FILE]   # sample corpus: wall time local disk vs local S3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    """``with LocalS3("bucket") as s3:`` a moto server subprocess with ``bucket``; stopped by pid on exit."""

    def __init__(self, bucket: str = "embeddings") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key_id = self.secret = ""
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalS3:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            self._wait_ready()
            self._set_up()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2).close()
                return
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:  # type: ignore[union-attr]
                    raise RuntimeError(f"moto server on {self.url} did not start") from None
                time.sleep(0.1)

    def _set_up(self) -> None:
        """A user with an S3 policy and an access key, the bucket; then credentials are enforced."""
        import boto3

        anyone = {"endpoint_url": self.url, "region_name": REGION}
        anyone |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anyone)
        iam.create_user(UserName="pipeline")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="pipeline")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        boto3.client("s3", **anyone).create_bucket(Bucket=self.bucket)
        request = urllib.request.Request(
            f"{self.url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )  # from now on every request must be signed with a known key
        urllib.request.urlopen(request, timeout=10).close()

    def connection(self, *, secret: str | None = None, endpoint: str | None = None) -> str:
        """The Airflow connection as ``AIRFLOW_CONN_<ID>`` JSON (optionally with a wrong secret or endpoint)."""
        extra = {"endpoint_url": endpoint or self.url, "region_name": REGION}
        return json.dumps(
            {"conn_type": "aws", "login": self.key_id, "password": secret or self.secret, "extra": extra}
        )

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, region_name=REGION,
            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
        )  # fmt: skip

    def objects(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` of every object under ``prefix``."""
        found: dict[str, int] = {}
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        ):
            found |= {o["Key"]: o["Size"] for o in page.get("Contents", [])}
        return found


def _run(corpus: str, work: str, store: str, home: str, env: dict[str, str]) -> dict[str, Any]:
    report = os.path.join(tempfile.mkdtemp(prefix="pe-s3-report-"), "report.json")
    command = [
        sys.executable, "-m", "pipeline", "run", corpus, "--work-dir", work, "--store", store,
        "--report", report, "--airflow-home", home,
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - started
    with open(report) as f:
        return json.load(f) | {"cli_wall_seconds": round(wall, 2)}


def measure(corpus: str, scratch: str) -> dict[str, Any]:
    """The sample corpus through the CLI on local disk, then on the local S3 endpoint (same Airflow home)."""
    home = os.path.join(scratch, "airflow-home")
    env = dict(os.environ)
    migrate = f"from pipeline import runner; runner.use_airflow_home({home!r})"
    subprocess.run([sys.executable, "-c", migrate], env=env, check=True)  # not part of either timing
    local = _run(corpus, f"{scratch}/work", f"{scratch}/store", home, env)
    with LocalS3() as s3:
        env["AIRFLOW_CONN_AWS_DEFAULT"] = s3.connection()
        remote = _run(corpus, f"s3://{s3.bucket}/work", f"s3://{s3.bucket}/store", home, env)
        staged = s3.objects("work/runs/")
        stored = sum(s3.objects("store/").values())
    pairs = remote["embeddings"]["expected"]
    return {
        "chunks": remote["chunks"],
        "pairs": pairs,
        "local_seconds": local["cli_wall_seconds"],
        "s3_seconds": remote["cli_wall_seconds"],
        "local_dag_seconds": local["wall_seconds"],
        "s3_dag_seconds": remote["wall_seconds"],
        "staged_objects": len(staged),
        "staged_bytes": sum(staged.values()),
        "staged_bytes_per_pair": round(sum(staged.values()) / max(1, pairs), 1),
        "store_bytes": stored,
        "same_counts": local["embeddings"] == remote["embeddings"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.local_s3", description=__doc__.splitlines()[0])
    parser.add_argument("corpus", help="corpus folder (e.g. from `python -m pipeline sample-corpus DIR`)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    figures = measure(os.path.abspath(args.corpus), tempfile.mkdtemp(prefix="pe-s3-measure-"))
    for name, value in figures.items():
        print(f"{name:<24} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
