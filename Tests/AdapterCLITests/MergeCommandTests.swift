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

    @Test("quantized bases: the retention note, --report's kept column, --dtype bf16|f16|f32 (f64 is a usage error)")
    func quantized() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try adapter("merge", "--report", fixture("models/tiny-fp8"), fixture("adapters/fp8-lora"), dir.file("fp8"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.split(separator: "\n").first == "tensor\tmodules\tmax_abs_delta\tsurvived\tkept")
        #expect(r.stderr.contains("requantized 3 quantized weights with fresh scales"))
        let d = try adapter("merge", "--dtype", "BF16", fixture("models/tiny-fp8"), fixture("adapters/fp8-lora"), dir.file("bf16"))
        #expect(d.status == 0 && d.stderr.contains("dequantized 7 quantized weights to BF16"), "\(d.stderr)")
        let bad = try adapter("merge", "--dtype", "f64", fixture("models/tiny-fp8"), fixture("adapters/fp8-lora"), dir.file("f64"))
        #expect(bad.status == 2 && bad.stderr.contains("'bf16', 'f16' or 'f32'"))
        let plain = try adapter("merge", "--dtype", "bf16", fixture("models/tiny-llama"), fixture("adapters/peft-lora"), dir.file("plain"))
        #expect(plain.status == 1 && plain.stderr.contains("the base has no quantized weights"))
        #expect(!FileManager.default.fileExists(atPath: dir.file("f64")) && !FileManager.default.fileExists(atPath: dir.file("plain")))
    }

    @Test("the requantizers' AVX2 and portable copies write the same bytes (FP8 per row, MXFP4, NVFP4)",
          arguments: [("tiny-fp8-channel", "fp8-lora"), ("tiny-gpt-oss-mxfp4", "mxfp4-lora"), ("tiny-nvfp4", "nvfp4-lora")])
    func portableRequantizers(_ base: String, _ lora: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let fast = try adapter(["merge", "--quiet", fixture("models/\(base)"), fixture("adapters/\(lora)"), dir.file("fast")])
        let portable = try adapter(["merge", "--quiet", fixture("models/\(base)"), fixture("adapters/\(lora)"), dir.file("portable")],
                                   environment: ["ADAPTER_PORTABLE_KERNELS": "1"])
        #expect(fast.status == 0 && portable.status == 0, "\(fast.stderr) \(portable.stderr)")
        let a = try Data(contentsOf: URL(fileURLWithPath: dir.file("fast/model.safetensors")))
        let b = try Data(contentsOf: URL(fileURLWithPath: dir.file("portable/model.safetensors")))
        #expect(a == b)
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
        // --force replaces only what this tool could have written: not three bytes of something else…
        expectOneLineError(try adapter("merge", "--force", "--quiet", base, ada, existing), containing: "replaces only a safetensors or GGUF file here, and this is neither")
        #expect(FileManager.default.contents(atPath: existing) == Data([1, 2, 3]))
        // …but a previous output, once the new one is complete.
        let previous = dir.file("previous.safetensors")
        #expect(try adapter("merge", "--quiet", base, fixture("adapters/moslora-original"), previous).status == 0)
        let before = FileManager.default.contents(atPath: previous)
        #expect(try adapter("merge", "--force", "--quiet", base, ada, previous).status == 0)
        #expect(FileManager.default.contents(atPath: previous) != before)
        // A GGUF output replaces a previous GGUF output the same way.
        let gguf = dir.file("previous.gguf")
        #expect(try adapter("merge", "--quiet", fixture("gguf/tiny-llama-64-f32.gguf"), fixture("adapters/gguf-lora"), gguf).status == 0)
        expectOneLineError(try adapter("merge", "--quiet", fixture("gguf/tiny-llama-64-f32.gguf"), fixture("adapters/gguf-lora"), gguf), containing: "already exists")
        #expect(try adapter("merge", "--force", "--quiet", "--dtype", "f16", fixture("gguf/tiny-llama-64-f32.gguf"), fixture("adapters/gguf-lora"), gguf).status == 0)
        #expect(try adapter("inspect", gguf).stdout.contains("F16 × 7"))
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

/// A safetensors file of F32 tensors (little-endian), header written by hand in the reference layout.
private func f32Safetensors(_ tensors: [(name: String, shape: [Int], values: [Float])]) -> Data {
    var offset = 0
    var entries: [String] = []
    for t in tensors.sorted(by: { $0.name < $1.name }) {
        entries.append("\"\(t.name)\":{\"dtype\":\"F32\",\"shape\":[\(t.shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(offset),\(offset + t.values.count * 4)]}")
        offset += t.values.count * 4
    }
    var header = Array(("{" + entries.joined(separator: ",") + "}").utf8)
    while header.count % 8 != 0 { header.append(0x20) }
    var data = Data()
    withUnsafeBytes(of: UInt64(header.count).littleEndian) { data.append(contentsOf: $0) }
    data.append(contentsOf: header)
    for t in tensors.sorted(by: { $0.name < $1.name }) { t.values.withUnsafeBytes { data.append(contentsOf: $0) } }
    return data
}

@Suite("adapter merge: un-merging (the built binary)")
struct UnmergeNoticeTests {
    @Test("a negative weight on a BF16 base says the un-merge is exact only up to rounding; on F32 it says nothing")
    func notice() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let ada = fixture("adapters/moslora-original")
        #expect(try adapter("merge", "--quiet", fixture("models/tiny-llama"), ada, dir.file("m")).status == 0)
        let u = try adapter("merge", "--weight", "-1", dir.file("m"), ada, dir.file("u"))
        #expect(u.status == 0, "\(u.stderr)")
        #expect(u.stderr.contains("note: a negative weight undoes a merge only up to rounding") && u.stderr.contains("BF16"), "\(u.stderr)")
        let f = try adapter("merge", "--weight", "-1", fixture("models/tiny-llama-f32.safetensors"), ada, dir.file("f.safetensors"))
        #expect(f.status == 0 && !f.stderr.contains("undoes a merge"), "\(f.stderr)")
        let plain = try adapter("merge", fixture("models/tiny-llama"), ada, dir.file("p"))
        #expect(plain.status == 0 && !plain.stderr.contains("undoes a merge"))
    }
}

@Suite("adapter merge --report (the built binary)")
struct MergeReportTests {
    @Test("--report never changes a byte of the output (F32 base, rank 16, 512 columns)")
    func reportKeepsBytes() throws {
        let dir = TempDir()
        defer { dir.remove() }
        var state: UInt64 = 12345
        func random() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(Int64(bitPattern: state >> 11) % 2_000_001 - 1_000_000) / 1_000_000
        }
        let rows = 192, cols = 512, r = 16
        #expect(FileManager.default.createFile(atPath: dir.file("base.safetensors"), contents: f32Safetensors([
            ("model.layers.0.mlp.up_proj.weight", [rows, cols], (0..<(rows * cols)).map { _ in random() }),
        ])))
        try FileManager.default.createDirectory(atPath: dir.file("ad"), withIntermediateDirectories: true)
        #expect(FileManager.default.createFile(atPath: dir.file("ad/adapter_model.safetensors"), contents: f32Safetensors([
            ("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", [r, cols], (0..<(r * cols)).map { _ in random() }),
            ("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", [rows, r], (0..<(rows * r)).map { _ in random() }),
        ])))
        #expect(FileManager.default.createFile(atPath: dir.file("ad/adapter_config.json"), contents: Data(#"{"peft_type": "LORA", "r": 16, "lora_alpha": 16}"#.utf8)))
        let plain = try adapter("merge", "--quiet", dir.file("base.safetensors"), dir.file("ad"), dir.file("plain.safetensors"))
        let reported = try adapter("merge", "--report", dir.file("base.safetensors"), dir.file("ad"), dir.file("reported.safetensors"))
        #expect(plain.status == 0 && reported.status == 0, "\(plain.stderr) \(reported.stderr)")
        let a = try #require(FileManager.default.contents(atPath: dir.file("plain.safetensors")))
        let b = try #require(FileManager.default.contents(atPath: dir.file("reported.safetensors")))
        #expect(a.count == b.count)
        #expect(a == b, "the --report output differs from the plain merge")
        #expect(reported.stdout.contains("model.layers.0.mlp.up_proj.weight\t1\t"))
        // Survival of an F32 merge: all of the update lands, up to one rounding per element.
        let survived = Double(reported.stdout.split(separator: "\n")[1].split(separator: "\t")[3]) ?? 0
        #expect(abs(survived - 1) < 1e-3, "\(reported.stdout)")
        // And the same for BF16 and F16 outputs of other bases: the fixtures.
        for base in ["models/tiny-llama", "models/tiny-llama-f16.safetensors"] {
            let out1 = dir.file("p-" + base.replacingOccurrences(of: "/", with: "_")), out2 = out1 + "-r"
            #expect(try adapter("merge", "--quiet", fixture(base), fixture("adapters/moslora-original"), out1).status == 0)
            #expect(try adapter("merge", "--report", fixture(base), fixture("adapters/moslora-original"), out2).status == 0)
            let first = try FileManager.default.subpathsOfDirectory(atPath: out1).sorted()
            if first.isEmpty {
                #expect(FileManager.default.contents(atPath: out1) == FileManager.default.contents(atPath: out2), "\(base)")
            } else {
                for f in first { #expect(FileManager.default.contents(atPath: out1 + "/" + f) == FileManager.default.contents(atPath: out2 + "/" + f), "\(base)/\(f)") }
            }
        }
    }
}

@Suite("merge: --add weights and the unknown-keys flag")
struct MergeArgumentTests {
    @Test("--add x:abc is a usage error (status 2), not a path that fails later")
    func badWeight() throws {
        let dir = TempDir()
        defer { dir.remove() }
        for spec in ["x:abc", ":0.5", "x:inf", ""] {
            let r = try adapter("merge", "--add", spec, fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-lora"), dir.file("o.safetensors"))
            #expect(r.status == 2, "\(spec): \(r.stderr)")
            #expect(r.stderr.contains("--add"), "\(spec): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("o.safetensors")))
        }
    }

    @Test("a path holding a colon is given with its weight; a weight of 0 changes nothing it touches")
    func pathWithColon() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.copyItem(atPath: fixture("adapters/peft-lora"), toPath: dir.file("odd:name"))
        let plain = try adapter("merge", "--quiet", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-lora"), dir.file("a.safetensors"))
        #expect(plain.status == 0, "\(plain.stderr)")
        let colon = try adapter("merge", "--quiet", "--add", dir.file("odd:name") + ":0", fixture("models/tiny-llama-f32.safetensors"),
                                fixture("adapters/peft-lora"), dir.file("b.safetensors"))
        #expect(colon.status == 0, "\(colon.stderr)")
        #expect(FileManager.default.contents(atPath: dir.file("a.safetensors")) == FileManager.default.contents(atPath: dir.file("b.safetensors")))
    }

    @Test("--drop-unknown and --allow-unknown are one flag")
    func oneFlag() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let refused = try adapter("merge", fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-unknown"), dir.file("r.safetensors"))
        expectOneLineError(refused, containing: "use --drop-unknown to merge without them")
        for flag in ["--drop-unknown", "--allow-unknown"] {
            let r = try adapter("merge", "--quiet", flag, fixture("models/tiny-llama-f32.safetensors"), fixture("adapters/peft-unknown"), dir.file(flag + ".safetensors"))
            #expect(r.status == 0, "\(flag): \(r.stderr)")
        }
        #expect(FileManager.default.contents(atPath: dir.file("--drop-unknown.safetensors")) == FileManager.default.contents(atPath: dir.file("--allow-unknown.safetensors")))
    }
}
