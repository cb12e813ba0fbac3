#!/usr/bin/env python3
"""Turn the raw timings that Benchmarks/run.sh collects into the results.

    python3 Benchmarks/report.py RESULTS_DIR [--pure-png]

Reads RESULTS_DIR/raw/ (machine.tsv, timings.tsv, sizes.tsv, kernel_*.tsv, blas*.txt,
inspect_folder.tsv, verify.tsv, notes.txt) and writes RESULTS_DIR/RESULTS.md,
RESULTS_DIR/results.json and RESULTS_DIR/merge_time.png (matplotlib when it imports, else a small
PNG writer of this file; --pure-png forces the latter). Only the standard library is needed.
"""
import json
import math
import os
import statistics
import struct
import sys
import zlib

MIB = 1024 * 1024
TOOLS = {  # key: (label in tables, label in the chart)
    "adapter_merge": ("`adapter merge` (fsync)", "adapter merge"),
    "adapter_merge_nosync": ("`adapter merge --no-sync`", "adapter merge --no-sync"),
    "cp": ("`cp -r`", "cp -r"),
    "cp_sync": ("`cp -r && sync`", "cp -r && sync"),
    "adapter_parts2": ("`adapter merge --part 1/2` ‖ `--part 2/2`, then `--finish` (fsync)", "adapter 2 parts + finish"),
    "numpy_merge": ("numpy + safetensors script", "numpy + safetensors"),
    "peft_merge": ("PEFT merge_and_unload + save_pretrained (plain-LoRA twin)", "PEFT (plain-LoRA twin)"),
}
COLORS = {"adapter_merge": (31, 119, 180), "adapter_merge_nosync": (23, 190, 207), "cp": (127, 127, 127),
          "cp_sync": (0, 0, 0), "adapter_parts2": (148, 103, 189), "numpy_merge": (255, 127, 14), "peft_merge": (214, 39, 40)}
TARGET_SIZE = 2.0


def read_tsv(path, header=False):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    if header and rows:
        keys = rows[0]
        return [dict(zip(keys, r)) for r in rows[1:]]
    return rows


def read_text(path):
    return open(path).read().strip() if os.path.exists(path) else ""


def fmt_s(x):
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_mib(kb):
    return "—" if kb is None else f"{kb / 1024:.0f}"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def verdict(ok):
    return "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")


def summarise(timings):
    """(section, size, tool) -> stats over the successful runs."""
    groups = {}
    for section, size, tool, run, wall, rss, rc in timings:
        g = groups.setdefault((section, float(size), tool), {"walls": [], "rss_kb": [], "failed": 0})
        if rc == "0":
            g["walls"].append(float(wall))
            g["rss_kb"].append(int(rss))
        else:
            g["failed"] += 1
    for g in groups.values():
        w = g["walls"]
        g.update(n=len(w), median_s=statistics.median(w) if w else None, min_s=min(w) if w else None,
                 max_s=max(w) if w else None, peak_rss_kb=max(g["rss_kb"]) if w else None,
                 median_rss_kb=statistics.median(g["rss_kb"]) if w else None)
    return groups


def parse_kernel(rows):
    out = {}
    for r in rows[1:]:
        if len(r) >= 6:
            out[(r[0], int(r[1]))] = {"threads": int(r[2]), "seconds": float(r[3]), "gb_s": float(r[4]),
                                      "gflop_s": float(r[5]), "vectorised": r[6] if len(r) > 6 else ""}
    return out


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    pure = "--pure-png" in sys.argv
    res = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    raw = os.path.join(res, "raw")
    machine = {r[0]: (r[1] if len(r) > 1 else "") for r in read_tsv(os.path.join(raw, "machine.tsv"))}
    timings = read_tsv(os.path.join(raw, "timings.tsv"))
    sizes = read_tsv(os.path.join(raw, "sizes.tsv"), header=True)
    notes = [n for n in read_text(os.path.join(raw, "notes.txt")).splitlines() if n]
    verify = read_tsv(os.path.join(raw, "verify.tsv"))
    k_adapter = parse_kernel(read_tsv(os.path.join(raw, "kernel_adapter.tsv")))
    k_numpy = parse_kernel(read_tsv(os.path.join(raw, "kernel_numpy.tsv")))
    k_numpy_env = parse_kernel(read_tsv(os.path.join(raw, "kernel_numpy_env.tsv")))
    blas = read_text(os.path.join(raw, "blas.txt"))
    blas_env = read_text(os.path.join(raw, "blas_env.txt"))
    inspect_folder = read_tsv(os.path.join(raw, "inspect_folder.tsv"))
    groups = summarise(timings)
    quick = machine.get("quick") == "1"

    size_info = {float(s["size_gb"]): s for s in sizes}
    size_list = sorted(size_info)
    tools = [t for t in TOOLS if any(k[0] == "merge" and k[2] == t for k in groups)]

    def stat(size, tool, key="median_s", section="merge"):
        g = groups.get((section, size, tool))
        return g[key] if g and g["n"] else None

    def ratio(a, b):
        return a / b if a is not None and b else None

    ref = TARGET_SIZE if TARGET_SIZE in size_info else (size_list[-1] if size_list else None)
    ref_note = "" if ref == TARGET_SIZE else f" (no {TARGET_SIZE:g} GB model in this run: measured at {ref:g} GB)" if ref else ""

    # ---- per-size derived numbers
    per_size = []
    for s in size_list:
        info = size_info[s]
        bound_kb = (2 * int(info["largest_bytes"]) + int(info["adapter_bytes"]) + 64 * MIB) / 1024
        m, mn, c, cs = (stat(s, t) for t in ("adapter_merge", "adapter_merge_nosync", "cp", "cp_sync"))
        pe, npy = stat(s, "peft_merge"), stat(s, "numpy_merge")
        per_size.append({
            "size_gb": s, "model_bytes": int(info["model_bytes"]), "layers": int(info["layers"]),
            "shards": int(info["shards"]), "largest_tensor": info["largest_tensor"],
            "largest_bytes": int(info["largest_bytes"]), "adapter_bytes": int(info["adapter_bytes"]),
            "lora_bytes": int(info["lora_bytes"]), "generate_s": float(info["generate_s"]),
            "memory_bound_kb": bound_kb,
            "merge_over_cp_sync": ratio(m, cs), "merge_nosync_over_cp": ratio(mn, c), "merge_over_cp": ratio(m, c),
            "peft_over_merge": ratio(pe, m), "peft_over_merge_nosync": ratio(pe, mn),
            "numpy_over_merge": ratio(npy, m), "numpy_over_merge_nosync": ratio(npy, mn),
            "merge_rss_kb": stat(s, "adapter_merge", "peak_rss_kb"),
            "merge_nosync_rss_kb": stat(s, "adapter_merge_nosync", "peak_rss_kb"),
            "peft_rss_kb": stat(s, "peft_merge", "peak_rss_kb"),
            "numpy_rss_kb": stat(s, "numpy_merge", "peak_rss_kb"),
        })
    by_size = {p["size_gb"]: p for p in per_size}

    # ---- targets
    targets = []
    pr = by_size.get(ref)
    if pr:
        r1a, r1b = pr["merge_over_cp_sync"], pr["merge_nosync_over_cp"]
        targets.append(("1a", f"merge (fsync) ≤ 1.3 × `cp -r && sync` at {ref:g} GB", fmt_ratio(r1a),
                        None if r1a is None else r1a <= 1.3))
        targets.append(("1b", f"merge --no-sync ≤ 1.3 × `cp -r` at {ref:g} GB", fmt_ratio(r1b),
                        None if r1b is None else r1b <= 1.3))
        r2, mem2 = pr["peft_over_merge"], ratio(pr["merge_rss_kb"], pr["peft_rss_kb"])
        targets.append(("2a", f"merge (fsync) ≥ 5× faster than PEFT merge+save at {ref:g} GB",
                        "PEFT skipped" if r2 is None else f"{r2:.1f}× faster", None if r2 is None else r2 >= 5))
        targets.append(("2b", f"merge peak RSS ≤ 1/10 of PEFT's at {ref:g} GB",
                        "PEFT skipped" if mem2 is None else f"{mem2:.3f} of PEFT's ({fmt_mib(pr['merge_rss_kb'])} vs {fmt_mib(pr['peft_rss_kb'])} MiB)",
                        None if mem2 is None else mem2 <= 0.1))
    mem_ok = [p["merge_rss_kb"] <= p["memory_bound_kb"] for p in per_size if p["merge_rss_kb"] is not None]
    mem_ok += [p["merge_nosync_rss_kb"] <= p["memory_bound_kb"] for p in per_size if p["merge_nosync_rss_kb"] is not None]
    rss_all = [p["merge_rss_kb"] for p in per_size if p["merge_rss_kb"] is not None]
    if mem_ok:
        spread = f"; spread {fmt_mib(min(rss_all))}–{fmt_mib(max(rss_all))} MiB" if rss_all else ""
        worst = max(((p["merge_rss_kb"] or 0) / p["memory_bound_kb"]) for p in per_size)
        targets.append(("3", "merge peak RSS ≤ 2 × largest tensor + adapter + 64 MiB at every size, flat",
                        f"worst {worst:.2f} of the bound{spread}", all(mem_ok)))
    kr = {k: k_adapter[k]["gb_s"] / k_numpy[k]["gb_s"] for k in k_adapter if k in k_numpy and k_numpy[k]["gb_s"]}
    if kr:
        targets.append(("4", "fused kernel ≥ 2× numpy's unfused computation (GB/s, every shape and rank)",
                        f"{min(kr.values()):.1f}×–{max(kr.values()):.1f}×", min(kr.values()) >= 2))
    ia, ip = stat(0.0, "adapter_inspect", section="inspect"), stat(0.0, "python_safe_open", section="inspect")
    ri = ratio(ia, ip)
    if ri is not None:
        targets.append(("5", "`adapter inspect` of 100 shards ≤ 0.2 × the Python safe_open listing",
                        f"{ri:.3f}× ({ia * 1000:.1f} vs {ip * 1000:.1f} ms)", ri <= 0.2))

    # ---- chart
    png = os.path.join(res, "merge_time.png")
    series = {t: [(by_size[s]["model_bytes"] / 1e9, stat(s, t)) for s in size_list if stat(s, t) is not None] for t in tools}
    chart_kind = draw_chart(png, series, machine, pure)

    # ---- markdown
    L = []
    mode = "quick mode (small models: checks the pipeline, not the targets)" if quick else "full run"
    L += [f"# adapter benchmark results — {mode}", "",
          f"Date: {machine.get('date', '?')} · command: `{machine.get('command', '?')}` · "
          f"{machine.get('runs', '?')} timed runs per tool and size, alternating, median reported · "
          f"total {machine.get('elapsed_s', '?')} s", "",
          "## Machine", "", "| | |", "|---|---|"]
    mem = machine.get("memory_bytes")
    for k, label in (("nproc", "cores (nproc)"), ("cpu", "CPU"), ("cpu_flags", "CPU features"), ("memory_bytes", "memory"),
                     ("disk", "disk (work folder)"), ("kernel", "kernel"), ("swift", "Swift"), ("python", "Python"),
                     ("peft", "PEFT stack"), ("git", "commit"), ("adapter", "adapter --version"),
                     ("openblas_env", "OpenBLAS overrides in this shell")):
        v = machine.get(k, "")
        if k == "memory_bytes" and mem:
            v = f"{float(mem) / 2**30:.1f} GiB"
        L.append(f"| {label} | {v or '—'} |")
    L.append(f"| numpy's BLAS (overrides unset, as benchmarked) | {blas or '—'} |")
    if blas_env:
        L.append(f"| numpy's BLAS with this shell's overrides | {blas_env} |")
    L.append("")

    if notes:
        L += ["## Skipped or failed", ""] + [f"- {n}" for n in notes] + [""]

    L += ["## Targets", "", f"Computed from this run{ref_note}.", "", "| # | target | measured | result |", "|---|---|---|---|"]
    for num, what, measured, ok in targets:
        L.append(f"| {num} | {what} | {measured} | {verdict(ok)} |")
    if quick:
        L += ["", "Quick-mode models are far smaller than the 2 GB reference: fixed costs (process start, Python "
              "imports) dominate and these verdicts say little about the full-size targets."]
    L.append("")

    if size_list:
        L += ["## Models", "", "| size | layers | shards | weights (GB) | largest tensor | adapter (MoSLoRA, F32) | plain-LoRA twin | memory bound (MiB) | generated in (s) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for p in per_size:
            L.append(f"| {p['size_gb']:g} GB | {p['layers']} | {p['shards']} | {p['model_bytes'] / 1e9:.3f} | "
                     f"{p['largest_tensor']} ({p['largest_bytes'] / MIB:.1f} MiB) | {p['adapter_bytes'] / MIB:.1f} MiB | "
                     f"{p['lora_bytes'] / MIB:.1f} MiB | {p['memory_bound_kb'] / 1024:.0f} | {p['generate_s']:.1f} |")
        L += ["", "Memory bound = 2 × largest tensor + adapter file + 64 MiB.", ""]

        L += ["## Merge wall time (s): median (min–max) of the timed runs", "",
              "| tool | " + " | ".join(f"{s:g} GB" for s in size_list) + " |", "|---|" + "---|" * len(size_list)]
        for t in tools:
            cells = []
            for s in size_list:
                g = groups.get(("merge", s, t))
                if not g or not g["n"]:
                    cells.append("failed" if g else "—")
                    continue
                c = f"{fmt_s(g['median_s'])} ({fmt_s(g['min_s'])}–{fmt_s(g['max_s'])})"
                if g["failed"]:
                    c += f", {g['failed']} failed"
                cells.append(c)
            L.append(f"| {TOOLS[t][0]} | " + " | ".join(cells) + " |")
        L += ["", "Throughput (GB of weights per second of median wall time):", "",
              "| tool | " + " | ".join(f"{s:g} GB" for s in size_list) + " |", "|---|" + "---|" * len(size_list)]
        for t in tools:
            L.append(f"| {TOOLS[t][0]} | " + " | ".join(
                "—" if stat(s, t) is None else f"{by_size[s]['model_bytes'] / 1e9 / stat(s, t):.2f}" for s in size_list) + " |")
        L += ["", "## Merge peak memory (MiB): largest \"Maximum resident set size\" over the runs", "",
              "| tool | " + " | ".join(f"{s:g} GB" for s in size_list) + " |", "|---|" + "---|" * len(size_list)]
        for t in tools:
            L.append(f"| {TOOLS[t][0]} | " + " | ".join(fmt_mib(stat(s, t, "peak_rss_kb")) for s in size_list) + " |")
        L.append("| bound for `adapter merge` | " + " | ".join(f"{by_size[s]['memory_bound_kb'] / 1024:.0f}" for s in size_list) + " |")
        L += ["", "## Ratios per size", "",
              "| ratio | " + " | ".join(f"{s:g} GB" for s in size_list) + " |", "|---|" + "---|" * len(size_list)]
        for key, label in (("merge_over_cp_sync", "merge (fsync) / `cp -r && sync` (target ≤ 1.3)"),
                           ("merge_nosync_over_cp", "merge --no-sync / `cp -r` (target ≤ 1.3)"),
                           ("merge_over_cp", "merge (fsync) / `cp -r` (fsync against no fsync)"),
                           ("peft_over_merge", "PEFT / merge (fsync) (target ≥ 5)"),
                           ("peft_over_merge_nosync", "PEFT / merge --no-sync (neither fsyncs)"),
                           ("numpy_over_merge", "numpy script / merge (fsync)"),
                           ("numpy_over_merge_nosync", "numpy script / merge --no-sync (neither fsyncs)")):
            L.append(f"| {label} | " + " | ".join(fmt_ratio(by_size[s][key]) for s in size_list) + " |")
        L.append("| merge peak RSS / PEFT's (target ≤ 0.1) | " + " | ".join(
            fmt_ratio(ratio(by_size[s]["merge_rss_kb"], by_size[s]["peft_rss_kb"])) for s in size_list) + " |")
        L.append("| merge peak RSS / bound (target ≤ 1) | " + " | ".join(
            fmt_ratio(ratio(by_size[s]["merge_rss_kb"], by_size[s]["memory_bound_kb"])) for s in size_list) + " |")
        L += ["", f"![merge wall time vs model size](merge_time.png) ({chart_kind})", ""]
        if verify:
            L += ["Correctness (untimed, before the timed runs): the merged weights of each tool compared "
                  "element by element with `numpy_merge.py --compare`.", "",
                  "| size | tools compared | result |", "|---|---|---|"]
            for v in verify:
                L.append(f"| {float(v[0]):g} GB | {v[1].strip()} | {v[2] if len(v) > 2 else ''} |")
            L.append("")

    if k_adapter:
        L += ["## Kernel: fused `adapter-kernel-bench` vs numpy unfused `W + s·B@(M@A)`", "",
              "Best of 5 calls each; GB/s counts bf16 bytes read and written (4 per weight), GFLOP/s counts "
              "2·rows·cols·rank.", "",
              "| shape | rank | adapter s | adapter GB/s | adapter GFLOP/s | numpy s | numpy GB/s | numpy GFLOP/s | speed-up |"
              + (" numpy GB/s with overrides |" if k_numpy_env else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if k_numpy_env else "")]
        for key, a in k_adapter.items():
            n = k_numpy.get(key)
            row = (f"| {key[0]} | {key[1]} | {a['seconds']:.4f} | {a['gb_s']:.2f} | {a['gflop_s']:.1f} | "
                   + (f"{n['seconds']:.4f} | {n['gb_s']:.2f} | {n['gflop_s']:.1f} | {a['gb_s'] / n['gb_s']:.1f}× |" if n else "— | — | — | — |"))
            if k_numpy_env:
                e = k_numpy_env.get(key)
                row += f" {e['gb_s']:.2f} |" if e else " — |"
            L.append(row)
        a0 = next(iter(k_adapter.values()))
        L += ["", f"Threads: adapter {a0['threads']} (vectorised: {a0['vectorised']}), numpy BLAS "
              f"{next(iter(k_numpy.values()))['threads'] if k_numpy else '—'} (elementwise steps single-threaded).", ""]

    if ia is not None:
        shards, tensors = (inspect_folder[0][1], inspect_folder[0][2]) if inspect_folder else ("100", "?")
        L += [f"## Inspect: {shards} shards, {tensors} tensors, headers only (whole process, median of "
              f"{groups[('inspect', 0.0, 'adapter_inspect')]['n']})", "",
              "| tool | median (ms) | min–max (ms) | peak RSS (MiB) |", "|---|---|---|---|"]
        for t, label in (("adapter_inspect", "`adapter inspect --tensors`"), ("python_safe_open", "Python `safe_open` listing (inspect_listing.py)")):
            g = groups.get(("inspect", 0.0, t))
            if g and g["n"]:
                L.append(f"| {label} | {g['median_s'] * 1000:.1f} | {g['min_s'] * 1000:.1f}–{g['max_s'] * 1000:.1f} | {fmt_mib(g['peak_rss_kb'])} |")
        L.append("")

    with open(os.path.join(res, "RESULTS.md"), "w") as f:
        f.write("\n".join(L))

    # ---- json
    def jkey(k):
        return {"section": k[0], "size_gb": k[1], "tool": k[2]}
    doc = {
        "machine": machine, "notes": notes, "quick": quick,
        "sizes": per_size,
        "summary": [dict(jkey(k), **{x: v for x, v in g.items() if x not in ("walls", "rss_kb")}) for k, g in sorted(groups.items())],
        "timings": [{"section": r[0], "size_gb": float(r[1]), "tool": r[2], "run": int(r[3]), "wall_s": float(r[4]),
                     "max_rss_kb": int(r[5]), "exit": int(r[6])} for r in timings],
        "kernel": {"adapter": [dict(shape=k[0], rank=k[1], **v) for k, v in k_adapter.items()],
                   "numpy": [dict(shape=k[0], rank=k[1], **v) for k, v in k_numpy.items()],
                   "numpy_with_openblas_overrides": [dict(shape=k[0], rank=k[1], **v) for k, v in k_numpy_env.items()],
                   "numpy_blas": blas, "numpy_blas_with_overrides": blas_env},
        "verify": [{"size_gb": float(v[0]), "tools": v[1].split(), "result": v[2] if len(v) > 2 else ""} for v in verify],
        "targets": [{"id": n, "target": w, "measured": m, "pass": ok} for n, w, m, ok in targets],
        "target_size_gb": ref,
    }
    with open(os.path.join(res, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")

    print(f"targets{ref_note}:")
    for num, what, measured, ok in targets:
        print(f"  {('PASS' if ok else 'MISS') if ok is not None else 'n/a '}  {num}: {what}: {measured}")
    print(f"wrote {res}/RESULTS.md, results.json, merge_time.png ({chart_kind})")


# ----------------------------------------------------------------------------- chart
def draw_chart(path, series, machine, pure):
    if not pure:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:
            pure = True
    if not pure:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=110)
        panels = ((axes[0], list(series), "log", "every tool (log scale)"),
                  (axes[1], ["adapter_merge", "adapter_merge_nosync", "cp", "cp_sync"], "linear", "adapter merge and the cp floors"))
        for ax, keys, yscale, title in panels:
            for t in keys:
                pts = series.get(t) or []
                if pts:
                    c = tuple(v / 255 for v in COLORS[t])
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=c, label=TOOLS[t][1],
                            linestyle="--" if t.startswith("cp") else "-")
            ax.set_xlabel("model size (GB of bf16 weights)")
            ax.set_ylabel("wall time, median (s)")
            ax.set_yscale(yscale)
            if yscale == "linear":
                ax.set_ylim(bottom=0)
            ax.set_xlim(left=0)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"merge wall time vs model size — {machine.get('nproc', '?')} cores, "
                     f"{machine.get('cpu', '')}, {machine.get('date', '')[:10]}"
                     + (" (quick mode)" if machine.get("quick") == "1" else ""))
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return "matplotlib"
    write_png_chart(path, series, machine)
    return "report.py's own PNG writer"


# A 5×7 pixel font, drawn for this file: each glyph is 7 rows of 5 bits, top row first.
FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), ".": (0, 0, 0, 0, 0, 12, 12), " ": (0,) * 7, "-": (0, 0, 0, 31, 0, 0, 0),
    "+": (0, 4, 4, 31, 4, 4, 0), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "&": (12, 18, 20, 8, 21, 18, 13),
    "_": (0, 0, 0, 0, 0, 0, 31), "/": (1, 1, 2, 4, 8, 16, 16), ":": (0, 12, 12, 0, 12, 12, 0), ",": (0, 0, 0, 0, 12, 4, 8),
    "a": (0, 0, 14, 1, 15, 17, 15), "b": (16, 16, 22, 25, 17, 17, 30), "c": (0, 0, 14, 16, 16, 17, 14),
    "d": (1, 1, 13, 19, 17, 17, 15), "e": (0, 0, 14, 17, 31, 16, 14), "f": (6, 9, 8, 28, 8, 8, 8),
    "g": (0, 15, 17, 17, 15, 1, 14), "h": (16, 16, 22, 25, 17, 17, 17), "i": (4, 0, 12, 4, 4, 4, 14),
    "j": (2, 0, 6, 2, 2, 18, 12), "k": (16, 16, 18, 20, 24, 20, 18), "l": (12, 4, 4, 4, 4, 4, 14),
    "m": (0, 0, 26, 21, 21, 17, 17), "n": (0, 0, 22, 25, 17, 17, 17), "o": (0, 0, 14, 17, 17, 17, 14),
    "p": (0, 0, 30, 17, 30, 16, 16), "q": (0, 0, 13, 19, 15, 1, 1), "r": (0, 0, 22, 25, 16, 16, 16),
    "s": (0, 0, 14, 16, 14, 1, 30), "t": (8, 8, 28, 8, 8, 9, 6), "u": (0, 0, 17, 17, 17, 19, 13),
    "v": (0, 0, 17, 17, 17, 10, 4), "w": (0, 0, 17, 17, 21, 21, 10), "x": (0, 0, 17, 10, 4, 10, 17),
    "y": (0, 0, 17, 17, 15, 1, 14), "z": (0, 0, 31, 2, 4, 8, 31),
    "A": (14, 17, 17, 31, 17, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "L": (16, 16, 16, 16, 16, 16, 31),
    "P": (30, 17, 17, 30, 16, 16, 16), "R": (30, 17, 17, 30, 20, 18, 17), "T": (31, 4, 4, 4, 4, 4, 4),
}


def write_png_chart(path, series, machine, width=800, height=500):
    px = bytearray([255]) * (width * height * 3)

    def dot(x, y, c):
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            px[i:i + 3] = bytes(c)

    def rect(x0, y0, x1, y1, c):
        for y in range(max(0, y0), min(height, y1)):
            for x in range(max(0, x0), min(width, x1)):
                dot(x, y, c)

    def line(x0, y0, x1, y1, c, thick=1, dash=0):
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for k in range(n + 1):
            if dash and (k // dash) % 2:
                continue
            x, y = round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n)
            rect(x - thick // 2, y - thick // 2, x - thick // 2 + thick, y - thick // 2 + thick, c)

    def text(x, y, s, c=(0, 0, 0), scale=2):
        for ch in s:
            rows = FONT.get(ch, FONT.get(ch.lower(), FONT[" "]))
            for r, bits in enumerate(rows):
                for col in range(5):
                    if bits >> (4 - col) & 1:
                        rect(x + col * scale, y + r * scale, x + (col + 1) * scale, y + (r + 1) * scale, c)
            x += 6 * scale
        return x

    left, right, top, bottom = 80, width - 20, 40, height - 60
    xs = [p[0] for pts in series.values() for p in pts] or [1]
    ys = [p[1] for pts in series.values() for p in pts] or [1]
    xmax, ymax = max(xs) * 1.05, max(ys) * 1.1

    def nice(v):  # a 1-2-2.5-5 step giving at most about 6 ticks
        raw = v / 5
        mag = 10 ** math.floor(math.log10(raw))
        return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)

    def fmtv(v):
        return f"{v:.2f}".rstrip("0").rstrip(".") if v < 10 else f"{v:.0f}"

    X = lambda v: round(left + (right - left) * v / xmax)
    Y = lambda v: round(bottom - (bottom - top) * v / ymax)
    for axis_max, is_x in ((xmax, True), (ymax, False)):
        step, v = nice(axis_max), 0.0
        while v <= axis_max + 1e-12:
            if is_x:
                line(X(v), top, X(v), bottom, (225, 225, 225))
                text(X(v) - 12, bottom + 8, fmtv(v), scale=1)
            else:
                line(left, Y(v), right, Y(v), (225, 225, 225))
                label = fmtv(v)
                text(left - 8 - 6 * len(label), Y(v) - 3, label, scale=1)
            v += step
    line(left, top, left, bottom, (0, 0, 0))
    line(left, bottom, right, bottom, (0, 0, 0))
    text(left + 150, bottom + 28, "model size (GB)", scale=2)
    text(8, 12, "merge wall time, median (s)", scale=2)
    ly = top + 6
    for t, pts in series.items():
        c = COLORS[t]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            line(X(x0), Y(y0), X(x1), Y(y1), c, thick=3, dash=8 if t.startswith("cp") else 0)
        for x, y in pts:
            rect(X(x) - 4, Y(y) - 4, X(x) + 5, Y(y) + 5, c)
        if pts:
            rect(left + 12, ly, left + 30, ly + 10, c)
            text(left + 36, ly - 2, TOOLS[t][1], scale=2)
            ly += 20

    raw = b"".join(b"\x00" + bytes(px[y * width * 3:(y + 1) * width * 3]) for y in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


if __name__ == "__main__":
    main()
