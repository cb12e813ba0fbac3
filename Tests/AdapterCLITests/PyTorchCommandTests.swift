import Foundation
import Testing

@Suite("PyTorch checkpoints in inspect, merge and convert (the built binary)")
struct PyTorchCommandTests {
    /// A PEFT folder holding adapter_model.bin (written by torch.save) and the peft-lora config.
    private func binAdapter(_ dir: TempDir) throws -> String {
        let folder = dir.file("bin-adapter")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: fixture("pytorch/adapter_model.bin"), toPath: folder + "/adapter_model.bin")
        try FileManager.default.copyItem(atPath: fixture("adapters/peft-lora/adapter_config.json"), toPath: folder + "/adapter_config.json")
        return folder
    }

    @Test("a folder with adapter_model.bin inspects like its safetensors twin")
    func inspect() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try adapter("inspect", "--json", try binAdapter(dir))
        #expect(r.status == 0, "\(r.stderr)")
        let o = try #require(parseJSONObject(r.stdout))
        let a = try #require(o["adapter"] as? [String: Any])
        #expect(a["format"] as? String == "peft")
        #expect((a["modules"] as? [Any])?.count == 2)
    }

    @Test("to-safetensors of a folder with both checkpoints converts both, the same way every run, and copies other .bin/.pt files")
    func toSafetensorsBoth() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = try binAdapter(dir)
        try FileManager.default.copyItem(atPath: fixture("pytorch/dtypes.pt"), toPath: folder + "/pytorch_model.bin")
        try FileManager.default.copyItem(atPath: fixture("pytorch/nested.pt"), toPath: folder + "/training_args.bin")
        try FileManager.default.copyItem(atPath: fixture("pytorch/parameter.pt"), toPath: folder + "/optimizer.pt")
        var outputs: [[String: Data]] = []
        for run in 0..<4 {
            let out = dir.file("st\(run)")
            let r = try adapter("convert", "to-safetensors", folder, out)
            #expect(r.status == 0, "\(r.stderr)")
            let names = try FileManager.default.contentsOfDirectory(atPath: out).sorted()
            #expect(names == ["adapter_config.json", "adapter_model.safetensors", "model.safetensors", "optimizer.pt", "training_args.bin"])
            outputs.append(Dictionary(uniqueKeysWithValues: names.map { ($0, FileManager.default.contents(atPath: out + "/" + $0)!) }))
        }
        #expect(outputs.allSatisfy { $0 == outputs[0] })
        #expect(outputs[0]["training_args.bin"] == FileManager.default.contents(atPath: fixture("pytorch/nested.pt")))
        #expect(outputs[0]["optimizer.pt"] == FileManager.default.contents(atPath: fixture("pytorch/parameter.pt")))
        let model = try adapter("inspect", "--json", "--tensors", dir.file("st0/model.safetensors"))
        let twin = try adapter("inspect", "--json", "--tensors", fixture("pytorch/dtypes.expected.safetensors"))
        #expect(parseJSONObject(model.stdout)?["tensor_count"] as? Int == parseJSONObject(twin.stdout)?["tensor_count"] as? Int)
    }

    @Test("to-safetensors writes the same tensors torch saved, and copies the config")
    func toSafetensors() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let out = dir.file("st")
        let r = try adapter("convert", "to-safetensors", try binAdapter(dir), out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: out)) == ["adapter_model.safetensors", "adapter_config.json"])
        // Same names, dtypes, shapes and bytes as the reference file torch's values were saved to.
        let ours = try adapter("inspect", "--json", "--tensors", out + "/adapter_model.safetensors")
        let theirs = try adapter("inspect", "--json", "--tensors", fixture("pytorch/adapter_model.expected.safetensors"))
        let a = try #require(parseJSONObject(ours.stdout)), b = try #require(parseJSONObject(theirs.stdout))
        func table(_ o: [String: Any]) -> [String] {
            ((o["tensors"] as? [[String: Any]]) ?? []).map { "\($0["name"]!) \($0["dtype"]!) \($0["shape"]!)" }.sorted()
        }
        #expect(table(a) == table(b))
        #expect(a["byte_count"] as? Int == b["byte_count"] as? Int)
    }

    @Test("merging the .bin adapter gives the same bytes as merging its safetensors twin", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func mergeTwin() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let bin = try binAdapter(dir)
        #expect(try adapter("convert", "to-safetensors", "--quiet", bin, dir.file("twin")).status == 0)
        // A base shaped for this adapter: q_proj and v_proj both 16 × 16.
        let base = dir.file("base.safetensors")
        let script = """
        import sys, numpy as np
        from safetensors.numpy import save_file
        rng = np.random.default_rng(1)
        save_file({f"model.layers.0.self_attn.{m}.weight": rng.standard_normal((16, 16)).astype(np.float32) for m in ("q_proj", "v_proj")},
                  sys.argv[1], metadata={"format": "pt"})
        """
        try #require(try runPython(script, base) == 0)
        let m1 = try adapter("merge", "--quiet", base, bin, dir.file("a.safetensors"))
        let m2 = try adapter("merge", "--quiet", base, dir.file("twin"), dir.file("b.safetensors"))
        #expect(m1.status == 0 && m2.status == 0, "\(m1.stderr) \(m2.stderr)")
        #expect(FileManager.default.contents(atPath: dir.file("a.safetensors")) == FileManager.default.contents(atPath: dir.file("b.safetensors")))
    }

    @Test("hostile pickles are refused in one line and nothing runs")
    func hostile() throws {
        for name in ["hostile_os_system.pt", "hostile_builtins_eval.pt", "hostile_unknown_global.pt", "hostile_bomb.pt", "legacy.pt", "torchscript.pt"] {
            let r = try adapter("inspect", fixture("pytorch/" + name))
            expectOneLineError(r, containing: name)
        }
        expectOneLineError(try adapter("inspect", fixture("pytorch/hostile_os_system.pt")), containing: "refuses global os.system")
    }

    @Test("a PyTorch base merges like its safetensors twin, written as safetensors", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func pytorchBase() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // The torch-saved PEFT-shaped file doubles as a base: merge a tiny adapter made for it.
        let base = fixture("pytorch/adapter_model.bin")
        let twin = dir.file("twin.safetensors")
        #expect(try adapter("convert", "to-safetensors", "--quiet", base, twin).status == 0)
        let script = """
        import sys, json, numpy as np
        from safetensors.numpy import save_file
        rng = np.random.default_rng(2)
        name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A"
        t = {"base_model.model." + name + ".lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
             "base_model.model." + name + ".lora_B.weight": rng.standard_normal((4, 2)).astype(np.float32)}
        save_file(t, sys.argv[1] + "/adapter_model.safetensors", metadata={"format": "pt"})
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 4}, open(sys.argv[1] + "/adapter_config.json", "w"))
        """
        try FileManager.default.createDirectory(atPath: dir.file("lora"), withIntermediateDirectories: true)
        try #require(try runPython(script, dir.file("lora")) == 0)
        let a = try adapter("merge", "--quiet", base, dir.file("lora"), dir.file("a.safetensors"))
        let b = try adapter("merge", "--quiet", twin, dir.file("lora"), dir.file("b.safetensors"))
        #expect(a.status == 0 && b.status == 0, "\(a.stderr) \(b.stderr)")
        #expect(FileManager.default.contents(atPath: dir.file("a.safetensors")) == FileManager.default.contents(atPath: dir.file("b.safetensors")))
    }
}
