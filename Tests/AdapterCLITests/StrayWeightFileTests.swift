import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Issue 12, item 5: a tensor file beside the merged ones (a stray model.safetensors) would reach
// OUT unmerged; it is refused, or left out with --skip-file.
@Suite("model folders: tensor files that are not part of the merge")
struct StrayWeightFileTests {
    @Test("a tensor file that is not part of the merge is refused with its name", arguments: [
        "model.safetensors", "consolidated.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "model.gguf", "rng_state.ckpt",
    ])
    func strayTensorFile(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try FileManager.default.createDirectory(atPath: parentPathOf(model + "/" + name), withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: fixture("models/tiny-llama-f32.safetensors"), toPath: model + "/" + name)
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        expectOneLineError(r, containing: name)
        #expect(r.stderr.contains("--skip-file"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: out))
        #expect(folderEntries(dir.path) == ["model"])
    }

    @Test("--skip-file excludes a stray tensor file (repeatable); it is not copied and a note says so")
    func skipFile() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        for name in ["model.safetensors", "consolidated.safetensors"] {
            try FileManager.default.copyItem(atPath: fixture("models/tiny-llama-f32.safetensors"), toPath: model + "/" + name)
        }
        let out = dir.file("out")
        let r = try adapter("merge", "--skip-file", "model.safetensors", "--skip-file", "consolidated.safetensors", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!folderEntries(out).contains("model.safetensors") && !folderEntries(out).contains("consolidated.safetensors"))
        #expect(folderEntries(out).contains("model-00001-of-00002.safetensors") && folderEntries(out).contains("tokenizer.json"))
        #expect(noteLines(r).count == 1 && noteLines(r)[0].contains("model.safetensors") && noteLines(r)[0].contains("--skip-file"), "\(r.stderr)")
        // A name that is not in the folder is a mistake worth saying.
        let typo = try adapter("merge", "--skip-file", "modle.safetensors", "--skip-file", "model.safetensors",
                               "--skip-file", "consolidated.safetensors", model, mosloraAdapter, dir.file("out2"))
        expectOneLineError(typo, containing: "modle.safetensors")
    }
}
