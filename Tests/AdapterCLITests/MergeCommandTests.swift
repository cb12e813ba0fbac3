import Foundation
import Testing

private func entries(_ dir: String) -> [String] {
    ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
}

/// Copies a fixture adapter folder so a test can change it.
private func copyFixture(_ name: String, to dir: TempDir) throws -> String {
    let target = dir.file(name)
    try FileManager.default.copyItem(atPath: fixture("adapters/" + name), toPath: target)
    return target
}

@Suite("adapter merge (the built binary)")
struct MergeCommandTests {
    @Test("merges a sharded base: same shard names, other files copied, index valid, summary on stderr")
    func shardedMerge() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("merged")
        let r = try adapter("merge", fixture("models/tiny-llama"), fixture("adapters/moslora-original"), out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(entries(out) == entries(fixture("models/tiny-llama")))
        for f in ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"] {
            #expect(FileManager.default.contents(atPath: out + "/" + f) == FileManager.default.contents(atPath: fixture("models/tiny-llama/" + f)))
        }
        #expect(r.stderr.contains("merged 10 modules into 10 tensors"))
        #expect(r.stdout.isEmpty)
        let inspect = try adapter("inspect", "--json", out)
        #expect(inspect.status == 0)
        #expect(entries(dir.path) == ["merged"])  // no temporaries left
    }

    @Test("--quiet prints nothing; --report prints a table")
    func quietAndReport() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let q = try adapter("merge", "--quiet", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-lora"), dir.file("q.safetensors"))
        #expect(q.status == 0 && q.stdout.isEmpty && q.stderr.isEmpty)
        let r = try adapter("merge", "--report", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-lora"), dir.file("r.safetensors"))
        #expect(r.status == 0)
        let lines = r.stdout.split(separator: "\n")
        #expect(lines.first == "tensor\tmodules\tmax_abs_delta\tsurvived")
        #expect(lines.count == 5)
    }

    @Test("OUT rules: must not exist, be, sit inside or contain an input")
    func outputRules() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture("models/tiny-llama-f32.safetensors")
        let ada = fixture("adapters/peft-lora")
        let existing = dir.write("exists.safetensors", [1, 2, 3])
        expectOneLineError(try adapter("merge", base, ada, existing), containing: "already exists")
        #expect(FileManager.default.contents(atPath: existing) == Data([1, 2, 3]))
        expectOneLineError(try adapter("merge", "--force", base, ada, base), containing: "is the input")
        expectOneLineError(try adapter("merge", fixture("models/tiny-llama"), ada, fixture("models/tiny-llama/sub")), containing: "inside the input")
        expectOneLineError(try adapter("merge", "--force", fixture("models/tiny-llama"), ada, fixture("models")), containing: "contains the input")
        expectOneLineError(try adapter("merge", "--force", base, ada, ada), containing: "is the input")
        // A symbolic link at OUT pointing at an input.
        let link = dir.file("link.safetensors")
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: base)
        expectOneLineError(try adapter("merge", "--force", base, ada, link), containing: "is the input")
        expectOneLineError(try adapter("merge", base, ada, dir.file("no/such/folder/out")), containing: "does not exist")
        // --force replaces a previous output once the new one is complete.
        #expect(try adapter("merge", "--force", "--quiet", base, ada, existing).status == 0)
        #expect(FileManager.default.contents(atPath: existing)!.count > 3)
    }

    @Test("preflight failures are listed together and nothing is written")
    func preflight() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // An adapter for the llama base merged into the GPT-2 base: no module maps.
        let r = try adapter("merge", fixture("models/tiny-gpt2.safetensors"), fixture("adapters/peft-lora"), dir.file("o.safetensors"))
        expectOneLineError(r, containing: "4 problems: module base_model.model.model.layers.0.self_attn.q_proj: no base tensor")
        // Unknown keys refused unless allowed.
        let u = try adapter("merge", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-unknown"), dir.file("u.safetensors"))
        expectOneLineError(u, containing: "2 unknown keys")
        let ok = try adapter("merge", "--allow-unknown", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-unknown"), dir.file("u.safetensors"))
        #expect(ok.status == 0, "\(ok.stderr)")
        // A kohya adapter for UNet and text encoder needs --component.
        let k = try adapter("merge", fixture("models/tiny-unet.safetensors"), fixture("adapters/kohya-unet.safetensors"), dir.file("k.safetensors"))
        expectOneLineError(k, containing: "choose with --component")
        let k2 = try adapter("merge", "--component", "unet", fixture("models/tiny-unet.safetensors"), fixture("adapters/kohya-unet.safetensors"), dir.file("k.safetensors"))
        #expect(k2.status == 0, "\(k2.stderr)")
        #expect(k2.stderr.contains("skipped 2 text_encoder modules"))
        #expect(entries(dir.path) == ["k.safetensors", "u.safetensors"])
    }

    @Test("a rank disagreement between A and B is refused with the module named", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func rankMismatch() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try copyFixture("peft-lora", to: dir)
        // Rewrite the adapter with a B of the wrong rank, using the Python reference writer.
        let script = """
        import sys, numpy as np
        from safetensors.numpy import load_file, save_file
        t = load_file(sys.argv[1])
        k = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        t[k] = np.zeros((16, 3), np.float32)
        save_file(t, sys.argv[1], metadata={"format": "pt"})
        """
        let p = try runPython(script, folder + "/adapter_model.safetensors")
        try #require(p == 0)
        let r = try adapter("merge", fixture("models/tiny-llama-f32.safetensors"), folder, dir.file("o.safetensors"))
        expectOneLineError(r, containing: "ranks disagree")
        #expect(!FileManager.default.fileExists(atPath: dir.file("o.safetensors")))
    }

    @Test("NaN in an adapter stops the merge naming the tensor; nothing is left behind", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func nanStops() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try copyFixture("peft-lora", to: dir)
        let script = """
        import sys, numpy as np
        from safetensors.numpy import load_file, save_file
        t = load_file(sys.argv[1])
        k = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
        t[k] = t[k].copy(); t[k][0, 0] = np.nan
        save_file(t, sys.argv[1], metadata={"format": "pt"})
        """
        try #require(try runPython(script, folder + "/adapter_model.safetensors") == 0)
        let out = dir.file("out")
        let r = try adapter("merge", fixture("models/tiny-llama"), folder, out)
        expectOneLineError(r, containing: "model.layers.1.self_attn.v_proj.weight")
        #expect(r.stderr.contains("nothing was written"))
        #expect(entries(dir.path) == ["peft-lora"])
    }

    @Test("--weight -1 (a negative number after the option) un-merges", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func unmergeSyntax() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let base = fixture("models/tiny-llama-f32.safetensors")
        #expect(try adapter("merge", "--quiet", base, fixture("adapters/peft-lora"), dir.file("m.safetensors")).status == 0)
        let r = try adapter("merge", "--quiet", "--weight", "-1", dir.file("m.safetensors"), fixture("adapters/peft-lora"), dir.file("u.safetensors"))
        #expect(r.status == 0, "\(r.stderr)")
        // F32 base: un-merging leaves only Float32 rounding noise, far below the update's size.
        let script = """
        import sys, numpy as np
        from safetensors.numpy import load_file
        a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
        worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
        sys.exit(0 if worst < 1e-6 else 1)
        """
        #expect(try runPython(script, base, dir.file("u.safetensors")) == 0)
    }

    @Test("bad usage exits 2")
    func usage() throws {
        #expect(try adapter("merge", "only-one").status == 2)
        #expect(try adapter("merge", "a", "b", "c", "--weight", "x").status == 2)
        #expect(try adapter("merge", "a", "b", "c", "--threads", "0").status == 2)
    }
}

/// Runs a Python snippet with arguments; returns its exit status.
func runPython(_ script: String, _ args: String...) throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", script] + args
    p.standardInput = FileHandle.nullDevice
    try p.run()
    p.waitUntilExit()
    return p.terminationStatus
}
