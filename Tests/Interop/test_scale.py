"""The split-merge recipes in scale/: each one runs a merge in parts and the result is compared byte
for byte with the one-process merge of the same inputs.

- Ray (scale/ray_merge.py): really run on a local Ray cluster of three nodes (ray.cluster_utils),
  one task per part, the parts spread over the nodes.
- Slurm (scale/slurm-array.sbatch, scale/slurm-submit.sh) and Kubernetes (scale/k8s-indexed-job.yaml):
  no scheduler runs here, so their scripts are exercised as the scheduler would run them: the sbatch
  script once per array index with the variables Slurm sets (through slurm-submit.sh and a stand-in
  for sbatch that runs what it is given), the Job's container commands once per completion index
  with the ConfigMap's variables, then the finish.
"""
import json
import os
import shlex
import subprocess
import sys
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


FAKE_SBATCH = r'''#!/usr/bin/env python3
"""Stands in for sbatch: runs an array job's script once per index with Slurm's variables, or a
--wrap command once its dependency (a job run before it) succeeded; prints the job id (--parsable)."""
import os, subprocess, sys
log = os.environ["FAKE_SBATCH_LOG"]
args = sys.argv[1:]
jobs = open(log).read().split() if os.path.exists(log) else []
job = str(1000 + len(jobs))
opts, rest = {}, []
i = 0
while i < len(args):
    a = args[i]
    if a.startswith("--") and not rest:
        key, _, value = a[2:].partition("=")
        if key == "wrap" and not value:
            value = args[i + 1]; i += 1
        opts[key] = value
    else:
        rest.append(a)
    i += 1
env = dict(os.environ, SLURM_JOB_ID=job, SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", "1"))
status = 0
if "array" in opts:
    lo, hi = map(int, opts["array"].split("-"))
    for k in range(lo, hi + 1):
        e = dict(env, SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_COUNT=str(hi - lo + 1))
        status |= subprocess.run(["bash", rest[0], *rest[1:]], env=e).returncode
elif "wrap" in opts:
    dep = opts["dependency"].split(":")
    assert dep[0] == "afterok" and dep[1] in [j.split(",")[0] for j in jobs], opts
    assert [j for j in jobs if j.startswith(dep[1] + ",")][0].endswith(",0"), "the dependency failed"
    status = subprocess.run(["sh", "-c", opts["wrap"]], env=env).returncode
open(log, "a").write(f"{job},{status}\n")
print(job)
'''


def test_slurm_recipe_exercised(sharded, tmp_path):
    base, want = sharded
    sbatch = tmp_path / "sbatch"
    sbatch.write_text(FAKE_SBATCH)
    sbatch.chmod(0o755)
    out = tmp_path / "merged"
    env = dict(os.environ, SBATCH=str(sbatch), FAKE_SBATCH_LOG=str(tmp_path / "jobs"), ADAPTER_BIN=str(interop.ADAPTER_BIN))
    r = subprocess.run(["bash", SCALE / "slurm-submit.sh", "3", base, ADAPTER, out], env=env, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parts: job 1000 (array 1-3); finish: job 1001" in r.stdout
    assert (tmp_path / "jobs").read_text().split() == ["1000,0", "1001,0"]
    assert files_of(out) == want
    # The array script alone refuses to run outside an array job, with a usage line.
    r = subprocess.run(["bash", SCALE / "slurm-array.sbatch", base, ADAPTER, out], capture_output=True, text=True,
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
