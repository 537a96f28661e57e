"""A real multi-node Ray cluster on one machine, for tests and the reliability suite: a head and
worker nodes, each a ``ray start --block`` process with its own loopback address, temp dir and
ports, and jobs sent with the real ``ray job submit`` CLI.

Each node gets its own address in 127.0.0.0/8 (head 127.0.0.1, workers 127.0.0.2, ...). Inside the
tests' private network namespace (scripts/test.sh; docs/stack.md §8) the whole range is loopback,
so Ray sees distinct nodes (own node id, own raylet, own object store) on one host. Nothing here
runs a global ``ray stop``: a node is stopped, or killed, through its own process group, and any
of its processes that left that group are found from the PIDs under it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from hyperscale.storage.local import REPO
from hyperscale.train.local import free_port

RAY = str(Path(sys.executable).parent / "ray")
# Never uploaded with --working-dir: a worktree's .venv may be a symlink, which `.venv/` in
# .gitignore does not match, and Ray would follow it.
UPLOAD_EXCLUDES = [".venv", ".git", "runs", "logs", "**/__pycache__"]


def wait_for_dashboard(address: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the head's dashboard at ``address`` (http://host:port) answers; ``proc``: its
    ``ray start`` process, which must not exit meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited early (rc {proc.returncode})")
        try:
            with urllib.request.urlopen(address + "/api/version", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # answering (401 while Ray's token auth is on; the ray CLI sends the token)
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {address} after {timeout} s")


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


class RayNode:
    """One ``ray start --block`` process (a new session: its own process group) and its log."""

    def __init__(self, args: list[str], ip: str, env: dict, log: Path, temp_dir: str):
        self.ip, self.log, self.temp_dir = ip, log, temp_dir
        self.proc = subprocess.Popen([RAY, "start", "--block", *args], stdout=open(log, "wb"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _signal_all(self, sig: int, pids: list[int]) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        for pid in pids:  # those that left the group (only PIDs found under this node)
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the node: ``ray start``, its raylet, object store, agents and every worker on it,
        at once (a machine lost without warning)."""
        self._signal_all(signal.SIGKILL, _descendants(self.proc.pid))
        self.proc.wait(30)

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (``ray start --block`` stops what it started), SIGKILL after ``timeout``."""
        if not self.alive():
            return
        pids = _descendants(self.proc.pid)
        self._signal_all(signal.SIGTERM, [])
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._signal_all(signal.SIGKILL, pids)
        if self.alive():
            self.proc.wait(10)


class LocalCluster:
    """A head on 127.0.0.1 (its own GCS, dashboard, agent and client-server ports; token auth on,
    as on a real cluster) and worker nodes added on other loopback addresses. ``env``: the
    environment of every node (and so of its jobs' drivers and workers), e.g. S3 settings.
    ``with LocalCluster(work, env) as c: c.add_node("127.0.0.2"); c.submit(...)``."""

    def __init__(self, work: Path, env: dict | None = None, head_cpus: float = 1):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.env = {**(env if env is not None else os.environ), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.gcs, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[RayNode] = []
        self.head = self._start("127.0.0.1", head_cpus, [
            "--head", f"--port={self.gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}"])
        try:
            wait_for_dashboard(self.address, self.head.proc)
            self.wait_alive("127.0.0.1")
        except BaseException:
            self.close()
            raise

    def _start(self, ip: str, cpus: float, role_args: list[str]) -> RayNode:
        temp_dir = tempfile.mkdtemp(prefix="hs-n-", dir="/tmp")  # short: unix socket path limit
        args = [*role_args, f"--node-ip-address={ip}", f"--num-cpus={cpus:g}", f"--temp-dir={temp_dir}",
                # Own ports for what would otherwise take fixed defaults (agent 52365) or one shared
                # range (workers 10002-19999): two nodes on one host must not collide.
                f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
                "--disable-usage-stats"]
        node = RayNode(args, ip, self.env, self.work / f"node-{ip}-{len(self.nodes)}.log", temp_dir)
        self.nodes.append(node)
        return node

    def add_node(self, ip: str, cpus: float = 1, timeout: float = 180) -> RayNode:
        """A worker node on ``ip`` (127.0.0.2, ...), once the cluster lists it alive."""
        node = self._start(ip, cpus, [f"--address=127.0.0.1:{self.gcs}"])
        self.wait_alive(ip, timeout, node)
        return node

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args, f"--address={self.address}"], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def node_list(self) -> list[dict]:
        """``ray list nodes``: node_id, node_ip, state (ALIVE / DEAD), ... of every node seen."""
        p = self.ray("list", "nodes", "--format=json", "--limit=1000")
        if p.returncode != 0:
            raise RuntimeError(f"ray list nodes failed: {p.stderr[-2000:]}")
        return json.loads(p.stdout)

    def wait_alive(self, ip: str, timeout: float = 180, node: RayNode | None = None) -> dict:
        """The ALIVE node on ``ip`` as ``ray list nodes`` shows it (node_id, ...)."""
        deadline = time.monotonic() + timeout
        while True:
            if node is not None and not node.alive():
                raise RuntimeError(f"ray start for {ip} exited (rc {node.proc.returncode}): "
                                   f"{node.log.read_text(errors='replace')[-2000:]}")
            try:
                found = [n for n in self.node_list() if n.get("node_ip") == ip and n.get("state") == "ALIVE"]
            except (RuntimeError, ValueError, subprocess.TimeoutExpired):
                found = []
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"no live Ray node on {ip} after {timeout:.0f} s")
            time.sleep(2)

    def submit(self, job: list[str], env_vars: dict | None = None, name: str = "job",
               agent_timeout: float = 240) -> str:
        """``ray job submit --no-wait`` of ``python <job...>`` with the repository as working dir;
        returns the submission id. The dashboard answers before the node's job agent has
        registered; until then Ray refuses with "No available agent to submit job, please try
        again later" (over 30 s once on a loaded machine), so ask again until ``agent_timeout``."""
        job_id = f"{name}-{secrets.token_hex(4)}"
        runtime_env = {"working_dir": str(REPO), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars or {}}
        cmd = [RAY, "job", "submit", f"--address={self.address}", f"--submission-id={job_id}", "--no-wait",
               f"--runtime-env-json={json.dumps(runtime_env)}", "--", sys.executable, *job]
        deadline = time.monotonic() + agent_timeout
        while True:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=self.env)
            out = p.stdout + p.stderr
            if "No available agent to submit job" not in out or time.monotonic() > deadline:
                break
            time.sleep(3)
        if p.returncode != 0:
            raise RuntimeError(f"ray job submit failed (rc {p.returncode}): {out[-3000:]}")
        return job_id

    def job_status(self, job_id: str) -> str | None:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (None: the cluster did not answer)."""
        p = self.ray("list", "jobs", "--format=json", f"--filter=submission_id={job_id}")
        try:
            jobs = json.loads(p.stdout) if p.returncode == 0 else []
        except ValueError:
            jobs = []
        return jobs[0]["status"] if jobs else None

    def wait_job(self, job_id: str, timeout: float = 900, poll_s: float = 3) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED); stops it and raises TimeoutError
        after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if time.monotonic() > deadline:
                self.ray("job", "stop", job_id)
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s (last status {status}): "
                                   f"{self.job_logs(job_id)[-3000:]}")
            time.sleep(poll_s)

    def job_logs(self, job_id: str) -> str:
        p = self.ray("job", "logs", job_id)
        return p.stdout + p.stderr

    def close(self) -> None:
        """Stop every node still running, workers before the head, and remove their temp dirs."""
        for node in reversed(self.nodes):
            node.stop()
        for node in self.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
