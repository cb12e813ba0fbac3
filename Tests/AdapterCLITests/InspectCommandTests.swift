import Foundation
import Testing

@Suite("adapter inspect (the built binary)")
struct InspectCommandTests {
    @Test("human summary of a safetensors file")
    func summary() throws {
        let r = try adapter("inspect", fixture("safetensors/golden-mixed.safetensors"))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("tensors     16"))
        #expect(r.stdout.contains("F32 × 2"))
        #expect(r.stdout.contains("format=pt"))
        #expect(r.stderr.isEmpty)
    }

    @Test("--tensors lists every tensor with dtype and shape")
    func tensors() throws {
        let r = try adapter("inspect", "--tensors", fixture("safetensors/golden-mixed.safetensors"))
        #expect(r.status == 0)
        #expect(r.stdout.contains("b.f32"))
        #expect(r.stdout.split(separator: "\n").contains { $0.hasPrefix("bf16 ") && $0.contains("BF16") && $0.contains("[4, 2]") })
    }

    @Test("--json prints one object with the documented fields")
    func json() throws {
        let r = try adapter("inspect", "--json", fixture("safetensors/golden-scalar-zero.safetensors"))
        #expect(r.status == 0)
        let o = try #require(parseJSONObject(r.stdout))
        #expect(o["tensor_count"] as? Int == 3)
        #expect(o["parameter_count"] as? Int == 2)
        #expect(o["byte_count"] as? Int == 8)
        #expect((o["files"] as? [String])?.count == 1)
        #expect((o["metadata"] as? [String: String])?["format"] == "pt")
        #expect(o["adapter"] is NSNull)
        let tensors = try #require(o["tensors"] as? [[String: Any]])
        let zero = try #require(tensors.first { $0["name"] as? String == "zero" })
        #expect(zero["shape"] as? [Int] == [0, 4])
        #expect(zero["dtype"] as? String == "F32")
    }

    @Test("an invalid file: exit 1 and one line naming the file and the problem")
    func invalid() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let p = dir.write("bad.safetensors", [3, 0, 0, 0, 0, 0, 0, 0] + Array("{}x".utf8))
        expectOneLineError(try adapter("inspect", p), containing: p + ": invalid header JSON")
        expectOneLineError(try adapter("inspect", dir.file("missing")), containing: "no such file or folder")
        let short = dir.write("short.safetensors", [1, 2])
        expectOneLineError(try adapter("inspect", short), containing: "header too small")
    }

    @Test("a 100-shard folder is inspected from its headers, every shard counted", .enabled(if: pythonReferenceAvailable, pythonReferenceMissing))
    func hundredShards() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let script = """
        import sys, json, numpy as np
        from safetensors.numpy import save_file
        folder, n, wm = sys.argv[1], 100, {}
        for i in range(n):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            t = {f"layers.{i}.w{j}": np.full((4, 4), i, np.float32) for j in range(3)}
            save_file(t, f"{folder}/{name}", metadata={"format": "pt"})
            wm.update({k: name for k in t})
        json.dump({"metadata": {"total_size": n * 3 * 64}, "weight_map": wm}, open(f"{folder}/model.safetensors.index.json", "w"))
        """
        try #require(try runPython(script, dir.path) == 0)
        let r = try adapter("inspect", "--json", dir.path)
        #expect(r.status == 0, "\(r.stderr)")
        let o = try #require(parseJSONObject(r.stdout))
        #expect((o["files"] as? [String])?.count == 100)
        #expect(o["tensor_count"] as? Int == 300)
        #expect(o["byte_count"] as? Int == 300 * 64)
    }

    @Test("bad usage exits 2")
    func usage() throws {
        #expect(try adapter("inspect").status == 2)
        #expect(try adapter("inspect", "--no-such-flag", "x").status == 2)
        #expect(try adapter("frobnicate").status == 2)
        #expect(try adapter("--help").status == 0)
    }
}
