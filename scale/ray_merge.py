#!/usr/bin/env python3
"""A split `adapter merge` on a Ray cluster: one Ray task per part, then the finish.

    python scale/ray_merge.py BASE ADAPTER OUT --parts N [--cpus-per-part K] [--address ADDR]
                              [--adapter-bin PATH] [--retries R] [-- MERGE OPTIONS...]

Every node must see BASE, ADAPTER and OUT's folder at the same paths (a shared filesystem) and have
the `adapter` binary (on PATH, or --adapter-bin). Each part runs `adapter merge BASE ADAPTER OUT
--part I/N --threads K` as a task that asks Ray for K CPUs; a part that fails is run again (up to
--retries times: a part is safe to rerun, it redoes only what is not complete), then one task runs
`--finish`, which checks every part's checksums and moves OUT into place. Options after `--` go to
every part and to the finish (the same options on both, as `adapter merge` requires).

--address: "auto" joins the cluster this machine belongs to (the default when RAY_ADDRESS is set),
an address joins that cluster, "local" starts a Ray instance on this machine. Needs `pip install ray`.
Exit status: 0 when OUT is complete, 1 when a part or the finish failed (its messages are printed).
"""
import argparse
import os
import subprocess
import sys
import time


def parse(argv):
    extra = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--parts", type=int, required=True, help="how many parts (tasks) to split the merge into")
    p.add_argument("--cpus-per-part", type=int, default=1, help="Ray CPUs per task, and the merge's --threads")
    p.add_argument("--address", default=None, help='"auto", a cluster address, or "local" (default: auto if RAY_ADDRESS is set, else local)')
    p.add_argument("--adapter-bin", default="adapter", help="the adapter executable on the workers")
    p.add_argument("--retries", type=int, default=2, help="times a failed part is run again")
    args = p.parse_args(argv)
    if args.parts < 1 or args.cpus_per_part < 1 or args.retries < 0:
        p.error("--parts and --cpus-per-part must be at least 1, --retries at least 0")
    args.extra = extra
    return args


def main(argv):
    args = parse(argv)
    import ray  # imported here so that --help works without Ray

    address = args.address or ("auto" if os.environ.get("RAY_ADDRESS") else "local")
    if address == "local":
        ray.init(num_cpus=max(args.cpus_per_part, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)

    def command(*flags):
        return [args.adapter_bin, "merge", args.base, args.adapter, args.out, *flags,
                "--threads", str(args.cpus_per_part), "--quiet", *args.extra]

    @ray.remote(num_cpus=args.cpus_per_part)
    def run(cmd):
        start = time.time()
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        return {"status": r.returncode, "stderr": r.stderr, "node": ray.get_runtime_context().get_node_id(),
                "seconds": time.time() - start}

    parts = {i: command("--part", f"{i}/{args.parts}") for i in range(1, args.parts + 1)}
    tries = {i: 0 for i in parts}
    pending = {run.remote(cmd): i for i, cmd in parts.items()}
    failed = {}
    nodes = set()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        result = ray.get(done[0])
        if result["status"] == 0:
            nodes.add(result["node"])
            print(f"part {i}/{args.parts}: done in {result['seconds']:.1f} s on node {result['node'][:12]}", flush=True)
            failed.pop(i, None)
            continue
        failed[i] = result["stderr"].strip()
        if tries[i] < args.retries:
            tries[i] += 1
            print(f"part {i}/{args.parts}: failed ({failed[i].splitlines()[-1] if failed[i] else 'status %d' % result['status']}); running it again", flush=True)
            pending[run.remote(parts[i])] = i
    if failed:
        for i, message in sorted(failed.items()):
            print(f"part {i}/{args.parts} failed:\n{message}", file=sys.stderr)
        return 1
    result = ray.get(run.remote(command("--finish")))
    if result["status"] != 0:
        print(f"finish failed:\n{result['stderr'].strip()}", file=sys.stderr)
        return 1
    print(f"finished {args.out} from {args.parts} parts on {len(nodes)} node{'s' if len(nodes) != 1 else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
