import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Issue 12, item 14: a FIFO where a file is read used to block forever.
@Suite("FIFOs in model and adapter folders (the built binary, with a deadline)")
struct SpecialFileCommandTests {
    @Test("a FIFO as a model folder's index, shard, single model file or other file is refused in one line, never waited on",
          arguments: ["model.safetensors.index.json", "model-00002-of-00002.safetensors", "tokenizer.json"])
    func fifoInModelFolder(_ name: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try makeFIFO(model + "/" + name)
        let (merge, mergeHung) = try adapterWithDeadline(5, "merge", model, mosloraAdapter, dir.file("out"))
        #expect(!mergeHung, "merge waited on the FIFO \(name)")
        expectOneLineError(merge, containing: name)
        #expect(merge.stderr.contains("FIFO"), "\(merge.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("out")))
        if name != "tokenizer.json" {
            let (inspect, inspectHung) = try adapterWithDeadline(5, "inspect", model)
            #expect(!inspectHung, "inspect waited on the FIFO \(name)")
            expectOneLineError(inspect, containing: "FIFO")
        }
    }

    @Test("a FIFO as a folder's only model.safetensors, or given directly, is refused")
    func fifoSingleModel() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("m"), withIntermediateDirectories: true)
        try makeFIFO(dir.file("m/model.safetensors"))
        for path in [dir.file("m"), dir.file("m/model.safetensors")] {
            let (r, hung) = try adapterWithDeadline(5, "inspect", path)
            #expect(!hung, "inspect \(path) waited on the FIFO")
            expectOneLineError(r, containing: "FIFO")
        }
    }

    @Test("a FIFO in an adapter folder (the scan for LoRA files, or adapter_model.safetensors) is refused, never waited on")
    func fifoInAdapterFolder() throws {
        let dir = TempDir()
        defer { dir.remove() }
        try FileManager.default.createDirectory(atPath: dir.file("scan"), withIntermediateDirectories: true)
        try makeFIFO(dir.file("scan/lora.safetensors"))
        let (scan, scanHung) = try adapterWithDeadline(5, "merge", try tinyModelCopy(dir), dir.file("scan"), dir.file("out"))
        #expect(!scanHung, "the adapter folder scan waited on the FIFO")
        expectOneLineError(scan, containing: "FIFO")

        try FileManager.default.copyItem(atPath: mosloraAdapter, toPath: dir.file("peft"))
        try makeFIFO(dir.file("peft/adapter_model.safetensors"))
        let (peft, peftHung) = try adapterWithDeadline(5, "inspect", dir.file("peft"))
        #expect(!peftHung)
        expectOneLineError(peft, containing: "FIFO")
    }
}
