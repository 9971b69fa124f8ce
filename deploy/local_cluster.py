"""A Spark standalone cluster and a Ray cluster on this machine, as separate processes.

`make cluster` uses it to give a user real clusters to point the CLI and
Airflow at; the cluster tests use the same functions, so what they test is
what a user starts. Every daemon binds 127.0.0.1 and is started with the
engines' own launchers: Spark's ``spark-class`` (shipped in the pyspark
distribution) running the standalone ``Master`` and ``Worker`` classes in the
foreground, and ``ray start --block`` for the Ray head and each worker node.

Each daemon is the leader of its own process group and its pid is written to
``STATE_DIR/<name>.pid``; :func:`stop` signals exactly those groups, so it
stops what was started here and nothing else (not another user's Ray, not a
test's local Ray). ``STATE_DIR/cluster.json`` records the addresses.

Standard library only (besides locating pyspark and ray): it is a launcher,
not part of the pipeline, and imports nothing of the project's.

Usage: ``python deploy/local_cluster.py start|stop|status [--state-dir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
# Scoring actors ask for this custom resource (settings: ray.actor_resources), and only
# worker nodes offer it: the head keeps the driver-side work, engines run on workers.
ENGINE_RESOURCE = "medscreen_engine"
DEFAULT_STATE_DIR = Path("work/cluster")


@dataclass
class ClusterInfo:
    """Where the started daemons listen, and the pids of their process groups."""

    state_dir: str
    spark_master: str | None = None
    spark_master_ui: str | None = None
    ray_address: str | None = None
    pids: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """An executable of this interpreter's environment (ray, spark-class), found beside it first."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _spark_class() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return str(Path(_find_spark_home()) / "bin" / "spark-class")


def _launch(state: Path, name: str, argv: list[str], env: dict[str, str]) -> int:
    """Start one daemon in a process group of its own, its output in STATE/logs/NAME.log."""
    (state / "logs").mkdir(parents=True, exist_ok=True)
    log = open(state / "logs" / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, cwd=state)
    log.close()
    (state / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _wait(what: str, check, timeout_s: float, state: Path, name: str) -> None:
    deadline = time.monotonic() + timeout_s
    pid = int((state / f"{name}.pid").read_text())
    while time.monotonic() < deadline and _group_alive(pid):
        if check():
            return
        time.sleep(0.5)
    tail = (state / "logs" / f"{name}.log").read_text(errors="replace")[-3000:]
    raise RuntimeError(f"{what} did not come up (waited up to {timeout_s:.0f} s); its log ends:\n{tail}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def spark_master_state(ui_url: str) -> dict:
    """The standalone master's JSON view (workers, applications, executors)."""
    with urllib.request.urlopen(f"{ui_url}/json/", timeout=5) as r:
        return json.load(r)


def start_spark(state: Path, info: ClusterInfo, env: dict[str, str], workers: int = 1,
                worker_cores: int = 1, worker_memory: str = "1g", timeout_s: float = 120) -> None:
    """Start a standalone master and WORKERS workers (each CORES cores, MEMORY for executors)."""
    port, ui = free_port(), free_port()
    # Small daemons: the master and worker JVMs only schedule, executors do the work.
    daemon_env = {**env, "SPARK_DAEMON_MEMORY": "256m", "SPARK_NO_DAEMONIZE": "1"}
    info.pids["spark-master"] = _launch(state, "spark-master", [
        _spark_class(), "org.apache.spark.deploy.master.Master",
        "--host", HOST, "--port", str(port), "--webui-port", str(ui)], daemon_env)
    info.spark_master = f"spark://{HOST}:{port}"
    info.spark_master_ui = f"http://{HOST}:{ui}"
    _wait("the Spark master", lambda: _port_open(port) and _port_open(ui), timeout_s, state, "spark-master")
    for n in range(1, workers + 1):
        name = f"spark-worker-{n}"
        work_dir = state / name
        work_dir.mkdir(parents=True, exist_ok=True)
        info.pids[name] = _launch(state, name, [
            _spark_class(), "org.apache.spark.deploy.worker.Worker",
            "--host", HOST, "--webui-port", str(free_port()), "--cores", str(worker_cores),
            "--memory", worker_memory, "--work-dir", str(work_dir), info.spark_master], daemon_env)

    def all_alive() -> bool:
        try:
            alive = [w for w in spark_master_state(info.spark_master_ui).get("workers", [])
                     if w.get("state") == "ALIVE"]
        except (OSError, ValueError):  # not listening yet, or its UI still starting (HTML, not JSON)
            return False
        return len(alive) >= workers

    _wait(f"{workers} Spark worker(s)", all_alive, timeout_s, state, "spark-worker-1")


def _ray_ports() -> list[str]:
    # Several Ray nodes share this host: every port a node opens must differ.
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port())]


def ray_alive_nodes(address: str) -> int:
    """How many nodes the cluster's GCS at ADDRESS counts alive (0 while it does not answer).

    Read from the GCS directly: this launcher is no driver, and the head runs
    without the dashboard (ray[data] does not bring its packages).
    """
    from ray._raylet import GcsClient

    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=5)
    except Exception:  # not up yet: the caller polls
        return 0
    return sum(1 for n in nodes.values() if n.state == 0)  # 0 = ALIVE in GcsNodeInfo


def ray_temp_dir(state: Path) -> str:
    """This cluster's own Ray temp directory (sessions, sockets, logs, the address file).

    Not the default /tmp/ray: there `ray start` records itself as "the latest
    cluster", and every bare ``ray.init()`` on the machine (another user's,
    the rest of a test session's) would join it instead of starting its own.
    Short, under the system temp directory: Ray's socket paths must fit
    AF_UNIX's 107 bytes.
    """
    record = state / "ray-temp-dir"
    if not record.exists():
        record.write_text(tempfile.mkdtemp(prefix="medscreen-ray-"))
    return record.read_text().strip()


def start_ray_head(state: Path, info: ClusterInfo, env: dict[str, str], head_cpus: float = 1,
                   object_store_bytes: int = 150_000_000, timeout_s: float = 120) -> None:
    """Start the Ray head (no engine resource: scoring actors never land on it)."""
    port = free_port()
    info.pids["ray-head"] = _launch(state, "ray-head", [
        _bin("ray"), "start", "--head", "--block", "--temp-dir", ray_temp_dir(state),
        "--node-ip-address", HOST, "--port", str(port),
        "--num-cpus", str(head_cpus), "--object-store-memory", str(object_store_bytes),
        "--include-dashboard", "false", "--disable-usage-stats",
        "--ray-client-server-port", str(free_port()), *_ray_ports()], env)
    info.ray_address = f"{HOST}:{port}"
    _wait("the Ray head", lambda: _port_open(port) and ray_alive_nodes(info.ray_address) >= 1,
          timeout_s, state, "ray-head")


def start_ray_worker(state: Path, info: ClusterInfo, env: dict[str, str], name: str, cpus: float = 1,
                     engine_slots: float = 1, object_store_bytes: int = 150_000_000,
                     timeout_s: float = 120) -> None:
    """Join one Ray worker node offering CPUS and ENGINE_SLOTS of the engine resource."""
    before = ray_alive_nodes(info.ray_address)
    info.pids[name] = _launch(state, name, [
        _bin("ray"), "start", "--block", "--address", info.ray_address, "--temp-dir", ray_temp_dir(state),
        "--node-ip-address", HOST,
        "--num-cpus", str(cpus), "--resources", json.dumps({ENGINE_RESOURCE: engine_slots}),
        "--object-store-memory", str(object_store_bytes), "--disable-usage-stats", *_ray_ports()], env)
    _wait(f"Ray worker node {name}", lambda: ray_alive_nodes(info.ray_address) > before,
          timeout_s, state, name)


def write_info(info: ClusterInfo) -> None:
    (Path(info.state_dir) / "cluster.json").write_text(json.dumps(asdict(info), indent=2))


def stop_one(state: Path, name: str, sig: int = signal.SIGTERM, grace_s: float = 5) -> None:
    """Stop one daemon started here (its whole process group); SIGKILL after GRACE_S."""
    pid_file = state / f"{name}.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.2)
    if _group_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pid_file.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # A zombie leader whose group is otherwise empty counts as gone.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def stop(state: Path) -> list[str]:
    """Stop every daemon whose pid file is in STATE (workers before their master/head)."""
    names = sorted(p.stem for p in state.glob("*.pid"))
    order = [n for n in names if "worker" in n] + [n for n in names if "worker" not in n]
    for name in order:
        stop_one(state, name)
    (state / "cluster.json").unlink(missing_ok=True)
    record = state / "ray-temp-dir"
    if record.exists():  # the Ray temp directory this cluster made, nothing else
        shutil.rmtree(record.read_text().strip(), ignore_errors=True)
        record.unlink()
    return order


def daemon_env() -> dict[str, str]:
    """The daemons' environment: this one, minus the pseudonymisation key (executors read its file)."""
    env = dict(os.environ)
    env.pop("MEDSCREEN_PSEUDONYM_KEY", None)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # Executors and Ray workers run this interpreter, as the driver does.
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def start(state: Path, spark_workers: int = 1, ray_workers: int = 1) -> ClusterInfo:
    """Both clusters; on any failure, stops what it had started and re-raises."""
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True)
    if list(state.glob("*.pid")):
        raise RuntimeError(f"{state} already has a cluster's pid files: run `make cluster-stop` first")
    info = ClusterInfo(state_dir=str(state))
    env = daemon_env()
    try:
        if spark_workers:
            start_spark(state, info, env, workers=spark_workers)
        start_ray_head(state, info, env)
        for n in range(1, ray_workers + 1):
            start_ray_worker(state, info, env, f"ray-worker-{n}")
    except BaseException:
        stop(state)
        raise
    write_info(info)
    return info


def how_to_use(info: ClusterInfo) -> str:
    return f"""Spark standalone: {info.spark_master}  (master UI {info.spark_master_ui})
Ray:              {info.ray_address}  (engine actors run on worker nodes: resource {ENGINE_RESOURCE})

Point the CLI at them:
  export MEDSCREEN_SPARK__MASTER={info.spark_master}
  export MEDSCREEN_RAY__ACTOR_RESOURCES='{{"{ENGINE_RESOURCE}": 0.5}}'
  export MEDSCREEN_PSEUDONYM__KEY_FILE=$PWD/work/pseudonym.key   # executors read the key from this file
  medscreen emr ingest ...            # or: --spark-master {info.spark_master}
  medscreen score emr ... --ray-address {info.ray_address}

Point Airflow at them (`make airflow` once, then, with the exports above in its environment):
  bash dags/standalone.sh connections delete spark_default
  bash dags/standalone.sh connections add spark_default --conn-type spark \\
      --conn-host spark://{HOST} --conn-port {info.spark_master.rsplit(':', 1)[1]}
  bash dags/standalone.sh variables set medscreen_ray_address {info.ray_address}

Stop them: make cluster-stop
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--spark-workers", type=int, default=1)
    p.add_argument("--ray-workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.action == "start":
        print(how_to_use(start(args.state_dir, args.spark_workers, args.ray_workers)))
    elif args.action == "stop":
        stopped = stop(args.state_dir.resolve())
        print("stopped: " + (", ".join(stopped) if stopped else "nothing (no pid files)"))
    else:
        info = args.state_dir / "cluster.json"
        print(info.read_text() if info.exists() else "no cluster started from here")
    return 0


if __name__ == "__main__":
    sys.exit(main())
