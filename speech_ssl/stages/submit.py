"""``speech-ssl submit``: a pipeline as a Ray job on a cluster (Ray Jobs API).

    speech-ssl submit ray.address=http://127.0.0.1:8265 pipeline=pretrain_finetune \\
        output_dir=/home/ray/outputs/run1 storage_path=s3://my-bucket/speech-ssl data.unlabeled=s3://...

takes the same keys as ``speech-ssl run`` (checked here, before anything is sent) plus ``job.*``, and
submits ``python -m speech_ssl run <your overrides>`` through ``ray.job_submission.JobSubmissionClient``:

* working directory: this project (``job.working_dir``), uploaded without what ``.gitignore`` and
  ``job.excludes`` leave out (``.git``, ``.venv``, ``outputs``). ``python -m`` runs the uploaded code, and
  Ray puts the same folder on every worker's path, so the cluster runs exactly this checkout.
* runtime environment: the cluster's installed environment (the Docker image plus this package's
  dependencies, installed by ``ray_cluster.yaml``'s setup commands), with ``job.pip`` packages on top if
  given, and ``job.env_vars``.
* the job id is printed, the job's logs are streamed until it ends (``job.wait=false``: return at once),
  and the command exits non-zero when the job fails or is stopped.

``ray.address`` is the cluster's job server, ``http://<head>:8265`` (through an SSH tunnel:
``ray dashboard ray_cluster.yaml`` forwards it to ``http://127.0.0.1:8265``); ``RAY_API_SERVER_ADDRESS`` or
``RAY_ADDRESS`` are used when it is not given. ``output_dir`` must be absolute: a path on the head node
(or shared storage mounted there), since a relative one would land in the job's temporary working copy.
The equivalent Ray command line:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m speech_ssl run <overrides>
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from speech_ssl.stages.run import Config as RunConfig

log = logging.getLogger(__name__)

# Never uploaded, whatever .gitignore says: history, environments, outputs, caches.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "outputs", "**/__pycache__", "*.egg-info", ".pytest_cache",
                    "benchmarks/results"]


@dataclass
class JobConfig:
    """
    working_dir: the folder uploaded as the job's working directory (default: this project, the folder
        holding pyproject.toml, conf/ and pipelines/).
    excludes: more paths (gitignore syntax) left out of the upload, besides .gitignore and DEFAULT_EXCLUDES.
    pip: packages installed for this job on top of the cluster's environment (runtime_env pip); empty:
        the cluster's installed environment as it is.
    env_vars: environment variables of the job's driver and workers.
    entrypoint_num_cpus: CPUs reserved on the cluster for the job's driver (it only coordinates: 0).
    submission_id: the job id (default: Ray makes one, raysubmit_...).
    wait: stream the job's logs and wait for its end; false: print the id and return.
    poll_seconds: status polling interval while waiting.
    """

    working_dir: Optional[str] = None
    excludes: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    env_vars: dict[str, str] = field(default_factory=dict)
    entrypoint_num_cpus: float = 0.0
    submission_id: Optional[str] = None
    wait: bool = True
    poll_seconds: float = 2.0


@dataclass
class Config(RunConfig):
    """The keys of ``speech-ssl run`` (validated here, run on the cluster) plus:

    job: how the job is submitted (job.*).
    forward: the ``speech-ssl run`` overrides sent with the job; the command line fills it
        (conf/submit/config.yaml), library callers give it themselves.
    """

    job: JobConfig = field(default_factory=JobConfig)
    forward: list[str] = field(default_factory=list)


def project_dir() -> Optional[Path]:
    """This checkout's root (pyproject.toml, conf/, pipelines/), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists() and (root / "pipelines").is_dir() and (root / "conf").is_dir():
        return root
    return None


def _strip(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def forwarded_overrides(overrides: list[str]) -> list[str]:
    """What ``speech-ssl run`` on the cluster gets: everything but the submission's own keys."""
    own = ("job", "forward")
    return [a for a in overrides if _strip(a) != "ray.address" and _strip(a).split(".")[0] not in own]


def entrypoint(overrides: list[str]) -> str:
    return shlex.join(["python", "-m", "speech_ssl", "run", *forwarded_overrides(overrides)])


def job_server_address(cfg: Config) -> str:
    from speech_ssl.config import ConfigError

    address = cfg.ray.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("ray.address", "give the cluster's job server, e.g. ray.address=http://127.0.0.1:8265 "
                                         "(through `ray dashboard ray_cluster.yaml`).")
    if "://" not in address:
        address = "http://" + address
    if address.startswith("ray://") or address.rstrip("/").endswith(":6379") or address.rstrip("/").endswith(":10001"):
        raise ConfigError("ray.address", f"{address} is not a job server: submit talks to the dashboard's job "
                                         "API, http://<head>:8265.")
    return address


def runtime_env(cfg: Config) -> dict[str, Any]:
    from speech_ssl.config import ConfigError

    working_dir = Path(cfg.job.working_dir).expanduser().resolve() if cfg.job.working_dir else project_dir()
    if working_dir is None or not working_dir.is_dir():
        raise ConfigError("job.working_dir", "give the speech-ssl project folder to upload (this installation "
                                             "is not a checkout).")
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": DEFAULT_EXCLUDES + list(cfg.job.excludes),
                           "env_vars": {"PYTHONUNBUFFERED": "1", **cfg.job.env_vars}}
    if cfg.job.pip:
        env["pip"] = list(cfg.job.pip)
    return env


def use_token_auth_if_available() -> None:
    """Ray 2.60 heads use token authentication by default; the Jobs client sends the token only in token
    mode, so switch it on when a token is at hand and the user has not chosen (as ``runtime.init_ray`` does)."""
    token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file)):
        os.environ["RAY_AUTH_MODE"] = "token"


def run(cfg: Config) -> dict[str, Any]:
    """Submit the pipeline as a Ray job; with ``job.wait`` stream its logs and fail when it fails."""
    from speech_ssl.config import ConfigError
    from speech_ssl.errors import SpeechSSLError

    import pipelines

    pipelines.load(cfg.pipeline)  # a misspelt pipeline fails here, not on the cluster
    if not os.path.isabs(cfg.output_dir) and "://" not in cfg.output_dir:
        raise ConfigError("output_dir", f"'{cfg.output_dir}' is relative: on the cluster it would land in the job's "
                                        "temporary working directory. Give an absolute path on the head node, e.g. "
                                        "output_dir=/home/ray/outputs/run1, or a URI such as output_dir=s3://BUCKET/runs/run1.")
    address = job_server_address(cfg)
    env = runtime_env(cfg)
    command = entrypoint(cfg.forward)
    use_token_auth_if_available()
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SpeechSSLError(f"cannot reach the Ray job server at {address}: {err}. Is the cluster up and the "
                             "tunnel open (`ray dashboard ray_cluster.yaml`)?") from None
    job_id = _submit_when_an_agent_is_ready(
        client, entrypoint=command, runtime_env=env, submission_id=cfg.job.submission_id,
        entrypoint_num_cpus=cfg.job.entrypoint_num_cpus,
        metadata={"speech_ssl_pipeline": cfg.pipeline, "output_dir": cfg.output_dir})
    print(f"submitted job {job_id} to {address}\n  entrypoint: {command}\n  working_dir: {env['working_dir']}\n"
          f"  follow: ray job logs --address {address} --follow {job_id}\n"
          f"  stop:   ray job stop --address {address} {job_id}", flush=True)
    result = {"job_id": job_id, "address": address, "entrypoint": command}
    if not cfg.job.wait:
        return result
    try:
        asyncio.run(_stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following job {job_id}; it keeps running (ray job stop --address {address} {job_id})",
              file=sys.stderr)
        raise
    except Exception as err:  # noqa: BLE001 - the log stream is a convenience; the status below decides
        log.warning("log streaming stopped (%s); waiting for the job to end", err)
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal:
        time.sleep(cfg.job.poll_seconds)
        status = client.get_job_status(job_id)
    info = client.get_job_info(job_id)
    result["status"] = str(status.value)
    if status != JobStatus.SUCCEEDED:
        raise SpeechSSLError(f"job {job_id} {status.value.lower()}: {info.message or 'no message'} "
                             f"(logs: ray job logs --address {address} {job_id})")
    print(f"job {job_id} succeeded", flush=True)
    return result


def _submit_when_an_agent_is_ready(client, wait_seconds: float = 90.0, **job) -> str:
    """``submit_job``, retried while the head answers "No available agent": a freshly started head serves
    the job API seconds before its node agent can take jobs (the same answer a user would otherwise have to
    retry by hand)."""
    from speech_ssl.errors import SpeechSSLError

    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "No available agent" not in str(err):
                raise
            if time.monotonic() > deadline:
                raise SpeechSSLError(
                    f"the Ray head accepts requests but no node agent can take jobs after {wait_seconds:.0f} s. "
                    "Usually the head node's dashboard agent could not bind its port (52365 by default; another "
                    "Ray on the same machine?): see dashboard_agent.log in the head's Ray log directory "
                    "(/tmp/ray/session_latest/logs) and restart the head with a free "
                    "--dashboard-agent-listen-port.") from None
            log.info("the Ray head has no job agent ready yet; retrying")
            time.sleep(2.0)


async def _stream_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
