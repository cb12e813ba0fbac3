import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Issue 12, item 17 (parts): names that are not UTF-8, `./` before shard names in an index, and a
// model folder holding a stray adapter_config.json.
@Suite("model folders: file names, ./ in the index, a stray adapter_config.json")
struct ModelFolderNameTests {
    @Test("a file whose name is not UTF-8 is copied with its exact name bytes and content")
    func nonUTF8Name() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        let name: [UInt8] = Array("vocab-".utf8) + [0xFF, 0xFE, 0x80] + Array(".txt".utf8)
        let fd = open(cPath(Array((model + "/").utf8) + name), O_WRONLY | O_CREAT | O_EXCL, 0o644)
        #expect(fd >= 0)
        _ = write(fd, "latin-1 vocab", 13)
        close(fd)
        try FileManager.default.createDirectory(atPath: model + "/sub", withIntermediateDirectories: true)
        let fd2 = open(cPath(Array((model + "/sub/").utf8) + name), O_WRONLY | O_CREAT | O_EXCL, 0o644)
        close(fd2)
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(rawEntryNames(out).contains(name), "\(rawEntryNames(out).map { String(decoding: $0, as: UTF8.self) })")
        #expect(rawEntryNames(out + "/sub") == [name])
        let copied = open(cPath(Array((out + "/").utf8) + name), O_RDONLY)
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = read(copied, &buffer, 64)
        close(copied)
        #expect(n == 13 && Array(buffer[0..<13]) == Array("latin-1 vocab".utf8))
    }

    @Test("a stray tensor file whose name is not UTF-8 is refused in one clear line")
    func nonUTF8TensorName() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        let name: [UInt8] = Array("model-".utf8) + [0xFF] + Array(".safetensors".utf8)
        let fd = open(cPath(Array((model + "/").utf8) + name), O_WRONLY | O_CREAT | O_EXCL, 0o644)
        close(fd)
        let r = try adapter("merge", model, mosloraAdapter, dir.file("out"))
        expectOneLineError(r, containing: #"model-\xFF.safetensors"#)
    }

    @Test("./ before shard names in the index is accepted and normalised")
    func dotSlashInIndex() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        let indexPath = model + "/model.safetensors.index.json"
        let text = String(decoding: FileManager.default.contents(atPath: indexPath)!, as: UTF8.self)
        try Data(text.replacingOccurrences(of: "\"model-0000", with: "\"./model-0000").utf8).write(to: URL(fileURLWithPath: indexPath))
        let inspect = try adapter("inspect", model)
        #expect(inspect.status == 0, "\(inspect.stderr)")
        #expect(inspect.stdout.contains("(model-00001-of-00002.safetensors … model-00002-of-00002.safetensors)"), "\(inspect.stdout)")
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(folderEntries(out) == folderEntries(fixture("models/tiny-llama")))
        let plain = dir.file("plain")
        #expect(try adapter("merge", "--quiet", fixture("models/tiny-llama"), mosloraAdapter, plain).status == 0)
        for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
            #expect(FileManager.default.contents(atPath: out + "/" + shard) == FileManager.default.contents(atPath: plain + "/" + shard))
        }
    }

    @Test("a model folder with a stray adapter_config.json is a model for inspect as for merge, with a warning")
    func strayAdapterConfig() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try Data(#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16}"#.utf8).write(to: URL(fileURLWithPath: model + "/adapter_config.json"))
        let inspect = try adapter("inspect", model)
        #expect(inspect.status == 0, "\(inspect.stderr)")
        #expect(inspect.stdout.contains("2 shards"))
        #expect(inspect.stderr.contains("warning") && inspect.stderr.contains("adapter_config.json"), "\(inspect.stderr)")
        let json = try adapter("inspect", "--json", model)
        #expect(json.status == 0 && parseJSONObject(json.stdout)?["adapter"] is NSNull, "\(json.stderr)")
        let merge = try adapter("merge", model, mosloraAdapter, dir.file("out"))
        #expect(merge.status == 0, "\(merge.stderr)")
        #expect(merge.stderr.contains("warning") && merge.stderr.contains("adapter_config.json"), "\(merge.stderr)")
        // A real adapter folder is still an adapter.
        let peft = try adapter("inspect", "--json", mosloraAdapter)
        #expect(!(parseJSONObject(peft.stdout)?["adapter"] is NSNull))
    }
}
