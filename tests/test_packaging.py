"""Installing and deploying newllm: built-in search spaces resolve from the package, the wheel
runs a search away from the checkout, the cluster files agree with the CLI and with each other,
and cluster/README.md's local walk-through runs as written."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from newllm import experiment
from newllm.search.cli import build_parser
from newllm.space import SpaceError, builtin_spaces, load_space, resolve_space

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "results", "build", "dist", "*.egg-info", "__pycache__",
                                     ".pytest_cache")
WALKTHROUGH = re.compile(r"<!-- walkthrough[^>]*-->\s*```bash\n(.*?)```", re.DOTALL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with its output unless it exits 0."""
    done = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture
def ray_env(tmp_path) -> Iterator[dict[str, str]]:
    """The environment of a Ray started by a test: caches and Ray's temp dir of its own. A private
    RAY_TMPDIR (short: Unix socket paths are limited to about 107 bytes) keeps the test's Ray out
    of /tmp/ray/ray_current_cluster, where every ray.init() on this machine looks for a cluster."""
    ray_tmp = tempfile.mkdtemp(prefix="ray")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(NEWLLM_CACHE=str(tmp_path / "cache"), RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_TOKEN=os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16))  # not ~/.ray/auth_token
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


# --- built-in search spaces ---------------------------------------------------------------


def test_builtin_spaces_resolve_from_the_package(tmp_path, monkeypatch):
    assert {"laptop", "gpu_cluster"} <= set(builtin_spaces())
    monkeypatch.chdir(tmp_path)  # away from the checkout: names, not relative paths
    laptop = Path(resolve_space("laptop"))
    assert laptop.is_file() and laptop.name == "laptop.yaml"
    assert resolve_space("laptop.yaml") == str(laptop)
    assert load_space(resolve_space("gpu_cluster")).objectives == ["val_ppl", "num_params"]
    (tmp_path / "laptop").write_text("params: {num_layers: {type: int, low: 1, high: 2}}\n")
    assert resolve_space("laptop") == "laptop"  # a file that exists wins over the built-in name
    assert resolve_space("no_such_space") == "no_such_space"
    with pytest.raises(SpaceError, match=r"'no_such_space' does not exist: .*built-in space \(.*laptop"):
        load_space(resolve_space("no_such_space"))


@pytest.mark.slow(seconds=50)
def test_wheel_runs_the_laptop_search_outside_the_checkout(tmp_path, ray_env):
    src, wheels, venv, away = (tmp_path / d for d in ("src", "wheels", "venv", "away"))
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)  # a clean tree: no stale build/ in the checkout
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, src])
    (wheel,) = wheels.glob("newllm-*.whl")
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    # The dependencies (torch, ray, ...) come from this environment, offline: its site-packages
    # listed in a .pth file go on the new venv's sys.path after the venv's own site-packages. A
    # directory named in a .pth file is not a site directory, so this environment's .pth files,
    # the editable newllm's finder among them, are not run there.
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "checkout-deps.pth").write_text("".join(f"{d}\n" for d in deps))
    away.mkdir()

    probe = run([python, "-c", "import newllm, newllm.space as s; print(newllm.__file__, s.resolve_space('laptop'))"],
                cwd=away, env=ray_env)
    module, space = probe.stdout.split()
    assert Path(module).resolve().is_relative_to(venv.resolve()), module  # the wheel's newllm, not the checkout's
    assert Path(space).resolve().is_relative_to(venv.resolve()) and space.endswith("laptop.yaml"), space

    search = run([python, "-m", "newllm.search", "--local", "--space", "laptop", "--num-trials", "1",
                  "--num-samples", "10", "--name", "wheel", "--storage-path", tmp_path / "res"], cwd=away, env=ray_env)
    assert f"1 trials of {space}" in search.stdout
    # Tune's own console table and TensorBoard hint would repeat what the search said, and name its classes
    assert "Configuration for experiment" not in search.stdout and "tensorboard" not in search.stdout.lower()
    # nor its per-trial logs, which the iterations table holds, nor its warning that its result grid misses them
    assert "Failed to fetch metrics" not in search.stderr + search.stdout
    assert not [p.name for p in (tmp_path / "res" / "wheel").rglob("*") if p.name in ("result.json", "progress.csv")
                or p.name.startswith("events.out.tfevents")]
    trials, iterations = experiment.load(tmp_path / "res" / "wheel")
    assert len(trials) == 1 and set(iterations.trial_id) == set(trials.trial_id)


# --- cluster files ------------------------------------------------------------------------


def yaml_strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict | list):
        for value in node.values() if isinstance(node, dict) else node:
            yield from yaml_strings(value)


def shell_texts(path: Path) -> list[str]:
    """The shell commands of a cluster file: a YAML file's strings, a Markdown file's bash blocks,
    a Dockerfile as a whole."""
    text = path.read_text()
    if path.suffix == ".yaml":
        return [s for doc in yaml.safe_load_all(text) for s in yaml_strings(doc)]
    if path.suffix == ".md":
        return re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [text]


def search_arguments(text: str) -> list[list[str]]:
    """The arguments of every ``python -m newllm.search`` command in shell ``text``."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if "newllm.search" in words:
            args = words[words.index("newllm.search") + 1:]
            ends = [i for i, w in enumerate(args) if w in ("&&", "||", ";", "|", "&")]
            found.append(args[:ends[0]] if ends else args)
    return found


def test_cluster_files_run_the_search_with_real_flags():
    parser = build_parser()
    flags = {s for action in parser._actions for s in action.option_strings}
    commands = {path.name: [args for text in shell_texts(path) for args in search_arguments(text)]
                for path in sorted(CLUSTER.iterdir()) if path.suffix in (".yaml", ".md") or path.name == "Dockerfile"}
    assert commands["kuberay-job.yaml"] and len(commands["README.md"]) >= 2, commands
    for name, found in commands.items():
        for args in found:
            unknown = [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in flags]
            assert not unknown, f"{name}: python -m newllm.search has no {unknown}"
            parser.parse_args(args)  # and the values parse (argparse exits on a bad one)


def test_cluster_files_pin_one_ray_version_and_one_image():
    docker = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:([\d.]+)-py\d+", docker, re.MULTILINE).group(1)
    installed = re.search(r"ray\[[\w,]+\]==([\d.]+)", docker).group(1)
    job = next(d for d in yaml.safe_load_all((CLUSTER / "kuberay-job.yaml").read_text()) if d["kind"] == "RayJob")
    spec = job["spec"]["rayClusterSpec"]
    assert base == installed == spec["rayVersion"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {yaml.safe_load((CLUSTER / "cluster.yaml").read_text())["docker"]["image"]}


@pytest.mark.slow(seconds=55)
@pytest.mark.alone
def test_cluster_readme_walkthrough_runs_as_written(tmp_path, ray_env):
    """Runs the marked bash block of cluster/README.md from the repository root, as a user would
    after the quick start, with free ports and a results directory in tmp through the block's
    own variables. Its last line and this test's cleanup are ``ray stop``, which stops every Ray
    on this machine: it runs alone."""
    ray = REPO / ".venv" / "bin" / "ray"
    if not ray.exists():
        pytest.skip("the walk-through runs in the quick start's .venv inside the checkout")
    (block,) = WALKTHROUGH.findall((CLUSTER / "README.md").read_text())
    num_trials = int(re.search(r"--num-trials (\d+)", block).group(1))
    env = {**ray_env, "RESULTS": str(tmp_path / "res"), **{name: str(free_port()) for name in
                                                           ("RAY_PORT", "DASHBOARD_PORT", "AGENT_PORT", "CLIENT_PORT")}}
    try:
        for _ in range(3):
            walk = subprocess.run(["bash", "-e", "-c", block], check=False, cwd=REPO, env=env, capture_output=True,
                                  text=True, timeout=400)
            if walk.returncode == 0 or "No available agent" not in walk.stdout + walk.stderr:
                break
            # the head's dashboard agent was not up yet, as the README warns: start over
            subprocess.run([ray, "stop"], check=False, env=env, capture_output=True, timeout=120)
        assert walk.returncode == 0, walk.stdout[-4000:] + walk.stderr[-4000:]
    finally:
        subprocess.run([ray, "stop"], check=False, env=env, capture_output=True, timeout=120)
    (exp_dir,) = (tmp_path / "res").iterdir()
    trials, _ = experiment.load(exp_dir)
    assert len(trials) == num_trials and set(trials.status) <= {"passed", "gate_failed"}
    assert all(t in walk.stdout for t in trials.trial_id)  # the block's own read of the results printed them
