"""The split-merge recipes in scale/: each one runs a merge in parts and the result is compared byte
for byte with the one-process merge of the same inputs.

- Ray (scale/ray_merge.py): really run on a local Ray cluster of three nodes (ray.cluster_utils),
  one task per part, the parts spread over the nodes.
- Slurm (scale/slurm-submit.sh, scale/slurm-array.sbatch): submitted to a real one-node Slurm
  cluster (munged, slurmctld, slurmd started by Tests/Interop/slurm/start.sh), the array of parts and
  the dependent finish job.
- Kubernetes (scale/k8s-indexed-job.yaml): no cluster runs here, so the Jobs are exercised as the
  pods would run them: the YAML parsed, its container commands run once per completion index with
  the ConfigMap's variables, then the finish's wait and the finish.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import interop

SCALE = interop.REPO / "scale"
ADAPTER = interop.ADAPTERS / "moslora-original"


def files_of(folder):
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """tiny-llama re-sharded into 5 files, with its index and other files, and its one-process merge."""
    root = tmp_path_factory.mktemp("scale")
    src = interop.MODELS / "tiny-llama"
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    names = sorted(tensors)
    base = root / "base"
    base.mkdir()
    weight_map, total = {}, 0
    for s in range(5):
        shard = f"model-{s + 1:05d}-of-00005.safetensors"
        mine = {n: tensors[n] for i, n in enumerate(names) if i % 5 == s}
        save_file(mine, base / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in mine})
        total += sum(t.numel() * t.element_size() for t in mine.values())
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for other in interop.LLAMA_AUX_FILES:
        (base / other).write_bytes((src / other).read_bytes())
    whole = root / "whole"
    interop.adapter("merge", base, ADAPTER, whole, "--quiet")
    return base, files_of(whole)


def test_ray_merge_on_a_local_three_node_cluster(sharded, tmp_path):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    base, want = sharded
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "merged"
        r = subprocess.run([sys.executable, SCALE / "ray_merge.py", base, ADAPTER, out, "--parts", "4",
                            "--address", cluster.address, "--adapter-bin", interop.ADAPTER_BIN],
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert files_of(out) == want
    assert sorted(os.listdir(tmp_path)) == ["merged"], "the staging folder is removed"
    lines = r.stdout.splitlines()
    assert sum(line.startswith("part ") and " done " in line for line in lines) == 4, r.stdout
    nodes = {line.rsplit("on node ", 1)[1] for line in lines if "on node " in line}
    assert len(nodes) >= 2, f"the parts ran on one node only: {r.stdout}"


def test_ray_merge_reports_a_failed_part(sharded, tmp_path):
    pytest.importorskip("ray")
    base, _ = sharded
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, SCALE / "ray_merge.py", base, tmp_path / "no-such-adapter", out, "--parts", "2",
                        "--address", "local", "--adapter-bin", interop.ADAPTER_BIN, "--retries", "1"],
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert "part 1/2 failed" in r.stderr and "no-such-adapter" in r.stderr
    assert not out.exists()


SLURM = Path(__file__).resolve().parent / "slurm"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster (Tests/Interop/slurm/start.sh: munged, slurmctld, slurmd as root).

    CI installs Slurm (.ci/run), so there a missing Slurm fails the test instead of skipping it."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        why = f"needs Slurm and root ({', '.join(missing) or 'not root'})"
        if os.environ.get("CI"):
            pytest.fail(why + ": .ci/run installs slurmctld, slurmd and munge")
        pytest.skip(why)
    run = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", SLURM / "start.sh", run], check=True, timeout=120)
    try:
        yield dict(os.environ, SLURM_CONF=str(run / "slurm.conf"))
    finally:
        subprocess.run(["bash", SLURM / "stop.sh", run], timeout=60)


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState"), fields.get("ExitCode")


def test_slurm_recipe_on_a_real_cluster(sharded, slurm, tmp_path):
    base, want = sharded
    out = tmp_path / "merged"
    env = dict(slurm, ADAPTER_BIN=str(interop.ADAPTER_BIN), SBATCH_OPTIONS="--cpus-per-task=1 --mem=512M")
    r = subprocess.run(["bash", SCALE / "slurm-submit.sh", "3", base, ADAPTER, out], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    words = r.stdout.split()
    parts, finish = words[words.index("parts:") + 2], words[words.index("finish:") + 2]
    deadline = time.time() + 300
    while job_state(env, finish)[0] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
        assert time.time() < deadline, subprocess.run(["scontrol", "show", "job"], env=env, capture_output=True, text=True).stdout
        time.sleep(0.5)
    logs = {p.name: p.read_text() for p in tmp_path.glob("adapter-merge-*.log")}
    assert job_state(env, finish) == ("COMPLETED", "0:0"), logs
    for task in range(1, 4):
        assert job_state(env, f"{parts}_{task}") == ("COMPLETED", "0:0"), logs
    assert sorted(logs) == sorted([f"adapter-merge-{parts}_{i}.log" for i in range(1, 4)] + [f"adapter-merge-finish-{finish}.log"])
    assert files_of(out) == want
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".log")) == ["merged"]


def test_slurm_array_script_outside_an_array_job(sharded, tmp_path):
    base, _ = sharded
    r = subprocess.run(["bash", SCALE / "slurm-array.sbatch", base, ADAPTER, tmp_path / "merged"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert r.returncode != 0 and "submit as an array job" in r.stderr


def test_kubernetes_indexed_job_exercised(sharded, tmp_path):
    yaml = pytest.importorskip("yaml")
    base, want = sharded
    docs = list(yaml.safe_load_all((SCALE / "k8s-indexed-job.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    parts = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "adapter-merge-parts")
    finish = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == "adapter-merge-finish")
    spec = parts["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == int(config["PARTS"]) and spec["parallelism"] <= spec["completions"]
    for job in (parts, finish):
        for c in job["spec"]["template"]["spec"].get("initContainers", []) + job["spec"]["template"]["spec"]["containers"]:
            assert c["envFrom"] == [{"configMapRef": {"name": "adapter-merge"}}]
            assert c["volumeMounts"] == [{"name": "models", "mountPath": "/models"}]

    def container_script(job, init=False):
        pod = job["spec"]["template"]["spec"]
        (c,) = pod["initContainers"] if init else pod["containers"]
        assert c["command"] == ["/bin/sh", "-c"]
        return c["args"][0]

    out = tmp_path / "merged"
    n = 3
    env = {**os.environ, **config, "BASE": str(base), "ADAPTER": str(ADAPTER), "OUT": str(out), "PARTS": str(n), "THREADS": "1",
           "PATH": f"{interop.ADAPTER_BIN.parent}:{os.environ['PATH']}"}
    wait = container_script(finish, init=True)
    for k in range(n):
        # Until every part is staged, the finish's init container keeps waiting.
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(["/bin/sh", "-c", wait], env=env, timeout=1)
        r = subprocess.run(["/bin/sh", "-c", container_script(parts)], env=dict(env, JOB_COMPLETION_INDEX=str(k)),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    subprocess.run(["/bin/sh", "-c", wait], env=env, timeout=30, check=True)
    r = subprocess.run(["/bin/sh", "-c", container_script(finish)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert files_of(out) == want
