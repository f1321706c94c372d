"""Shared test fixtures."""

from __future__ import annotations

import fcntl
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

    from newllm.data import TokenData


def pytest_configure(config) -> None:
    # Ray >= 2.59 wants token authentication for `ray start` and `ray job submit`. One token for
    # the whole session, in the environment that every Ray this session starts inherits (local
    # ray.init, test clusters, drivers in subprocesses), so none writes ~/.ray/auth_token.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def expected_seconds(item: pytest.Item) -> float:
    """How long a test takes on 2 cores, about: ``slow(seconds=...)`` says it; a slow test
    without, SLOW_SECONDS; any other, none to speak of."""
    slow = item.get_closest_marker("slow")
    return 0.0 if slow is None else slow.kwargs.get("seconds", SLOW_SECONDS)


SLOW_SECONDS = 30


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # longest first: run side by side (pytest -n 2), the short ones fill in at the end; a test
    # that runs alone last, when the other worker has at most a short test left to finish. The
    # tests of one xdist_group stay together, longest first, at the place of their sum: they share
    # a module fixture (a search, a cluster), which pytest tears down as soon as the next test is
    # another module's. The tests that read the session's tiny search are one group, so that one
    # worker runs that search, once
    for item in items:
        if "tiny_search" in getattr(item, "fixturenames", ()) and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group("tiny_search"))

    def group(item: pytest.Item) -> str:
        marker = item.get_closest_marker("xdist_group")
        return marker.args[0] if marker else item.nodeid

    seconds: dict[str, float] = {}
    for item in items:
        seconds[group(item)] = seconds.get(group(item), 0.0) + expected_seconds(item)
    items.sort(key=lambda item: (item.get_closest_marker("alone") is None, seconds[group(item)], group(item),
                                 expected_seconds(item)), reverse=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    # a group pytest-xdist failed to mark would run split across workers, each running its
    # module's search again: say so rather than run slowly
    if session.config.getoption("loadgroup", False):
        lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not mark the xdist_group of {lost[0]} (and "
                                    f"{len(lost) - 1} more): this pytest and pytest-xdist do not work together")


# Every test holds this file shared while it runs (its fixtures included), a test marked
# ``alone`` holds it exclusive: that test stops every Ray on this machine (``ray stop``), so no
# other test, in this session or in another one beside it, runs meanwhile.
RAY_STOP_LOCK = Path(tempfile.gettempdir()) / "newllm-tests-ray-stop.lock"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    with open(RAY_STOP_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if item.get_closest_marker("alone") else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayCluster:
    """A running multi-node Ray cluster on this machine: ``cluster`` (its handle: ``add_node``,
    ``remove_node``), ``workers`` (the two 1-CPU worker nodes) and the job-submission address."""

    cluster: Cluster
    workers: list
    dashboard: str

    @property
    def address(self) -> str:
        return self.cluster.address

    def replace(self, lost) -> None:
        """A new 1-CPU worker node in place of ``lost``, which a test removed."""
        self.workers.remove(lost)
        self.workers.append(self.cluster.add_node(num_cpus=1))
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A head that schedules no trials (``num_cpus=0``) and two worker nodes of 1 CPU each, torn
    down by its own handle; one per module (its tests share an ``xdist_group``), as starting one
    takes a loaded machine half a minute. Node deaths are detected within about a second. It
    holds RAY_STOP_LOCK shared while it lives, so that no ``alone`` test stops it between tests."""
    from ray.cluster_utils import Cluster

    with open(RAY_STOP_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        port = free_port()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
            # the head's dashboard agent takes jobs; on Ray's default port (52365) it would fail to
            # bind while any other Ray on this machine holds it, and every submission would end in
            # "No available agent"
            "dashboard_agent_listen_port": free_port(),
            "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                               "health_check_initial_delay_ms": 0}})
        try:
            workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
            cluster.wait_for_nodes()
            yield RayCluster(cluster, workers, f"http://127.0.0.1:{port}")
        finally:
            cluster.shutdown()


# a search space whose trials finish in seconds; %s takes more fixed settings
TINY_SPACE = """
num_trials: 3
params:
  context_dim: {type: categorical, choices: [8, 16]}
  num_layers: {type: int, low: 1, high: 2}
  dist_reg_weight: {type: float, low: 0.1, high: 0.8}
fixed:
  embed_dim: 8
  phase1_max_iter: 4
  phase1_streams: 4
  phase2_epochs: 2
  phase2_lr: 0.001
  phase2_batch_size: 64
  %s
data:
  num_samples: 6
  vocab_size: 300
"""


def write_table(frame: pd.DataFrame, table: Path) -> None:
    """``frame`` as the one part file of the experiment table directory ``table`` (as a search
    leaves it)."""
    table.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(table / "part-000001.parquet", index=False)


def tiny_space_text(extra: str = "") -> str:
    """TINY_SPACE with ``extra`` fixed settings (YAML lines), which replace those of the same name
    (a key given twice is refused)."""
    given = {line.split(":")[0].strip() for line in extra.splitlines() if ":" in line}
    kept = "\n".join(line for line in TINY_SPACE.splitlines()
                     if not (line.startswith("  ") and line.split(":")[0].strip() in given and "{" not in line))
    return kept % extra


@pytest.fixture
def tiny_space(tmp_path) -> Callable[..., str]:
    """Writes TINY_SPACE with ``extra`` fixed settings (YAML lines) to a file; returns its path."""
    def write(extra: str = "", name: str = "tiny.yaml") -> str:
        path = tmp_path / name
        path.write_text(tiny_space_text(extra))
        return str(path)
    return write


@dataclass(frozen=True)
class TinySearch:
    """A finished tiny search: its experiment directory, the data its trials trained on, and Tune's
    staging area of the driver (in the Ray session's folder), which Tune copies to the experiment."""

    directory: Path
    data: TokenData
    staging: Path


@pytest.fixture(scope="session")
def tiny_search(tmp_path_factory) -> TinySearch:
    """One small real search (3 trials, default Phase 2 mode at LR 1e-3, a gate every trial
    that does not diverge passes) shared by the tests that read a search's results. Tests
    that change the experiment must copy it first."""
    import ray

    from newllm.search import cli
    from newllm.data import DataConfig, prepare_data
    from newllm.space import load_space

    root = tmp_path_factory.mktemp("tiny_search")
    space = root / "tiny.yaml"
    space.write_text(TINY_SPACE % "gate_train_er: 0.0\n  gate_val_er: 0.0")
    saved = {"NEWLLM_CACHE": os.environ.get("NEWLLM_CACHE")}
    os.environ["NEWLLM_CACHE"] = str(root / "cache")
    try:
        code = cli.main(["--local", "--space", str(space), "--name", "tiny", "--storage-path", str(root / "res")])
        assert code == 0
        data = prepare_data(DataConfig(**load_space(space).data))
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        (staging,) = session.glob("artifacts/*/tiny/driver_artifacts")
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return TinySearch(root / "res" / "tiny", data, staging)
