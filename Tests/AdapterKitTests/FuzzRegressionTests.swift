import Foundation
import Testing
@testable import AdapterKit

// Inputs the libFuzzer targets in Fuzz/ found to crash, hang or over-allocate, kept under
// Fixtures/fuzz/<target>/ and replayed here through the same entry points the targets use, so
// each fixed bug stays fixed without building the fuzzers. A replay passes when the input is
// refused with an error (or accepted) quickly, without trapping.

/// The fuzz targets' entry points, one per folder of Fixtures/fuzz.
enum FuzzReplay {
    static func safetensorsHeader(_ bytes: [UInt8]) throws {
        _ = try SafetensorsHeader.parse(file: "fuzz", fileSize: bytes.count, prefix: Array(bytes.prefix(8))) { n in Array(bytes[8..<(8 + n)]) }
    }

    static func modelIndex(_ bytes: [UInt8], in dir: TempDir) throws {
        for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] where !FileManager.default.fileExists(atPath: dir.file("model/" + shard)) {
            _ = dir.write("model/" + shard, readBytes(fixture("models/tiny-llama/" + shard)))
        }
        _ = dir.write("model/model.safetensors.index.json", bytes)
        _ = try Checkpoint(path: dir.file("model"))
    }

    static func adapterConfig(_ bytes: [UInt8], in dir: TempDir) throws {
        guard let selector = bytes.first else { return }
        let layouts = [("peft", "adapter_config.json", ["adapters/moslora-original/adapter_model.safetensors", "adapters/mlx/adapters.safetensors"]),
                       ("paddle", "lora_config.json", ["adapters/paddle/peft_model.safetensors"]),
                       ("mytransformers", "config.json", ["adapters/mytransformers/final.safetensors"])]
        let (folder, name, tensors) = layouts[Int(selector) % 3]
        for t in tensors { _ = dir.write(folder + "/" + t.split(separator: "/").last!, readBytes(fixture(t))) }
        _ = dir.write(folder + "/" + name, Array(bytes.dropFirst()))
        _ = try Adapter(path: dir.file(folder))
    }

    static func zip(_ bytes: [UInt8], in dir: TempDir) throws {
        let archive = try ZipArchive(path: dir.write("input.zip", bytes))
        for entry in archive.entries { _ = try archive.withContents(of: entry) { $0.count } }
    }

    static func torch(_ bytes: [UInt8], in dir: TempDir) throws {
        let checkpoint = try TorchCheckpoint(path: dir.write("input.pt", bytes))
        for t in checkpoint.entries { _ = try checkpoint.withBytes(of: t.name) { $0.count } }
    }

    static func pickle(_ bytes: [UInt8]) throws {
        var machine = PickleMachine(bytes)
        defer { machine.breakCycles() }
        let root = try machine.run()
        _ = try TorchCheckpoint.collectTensors(root, path: "fuzz", pickleBytes: bytes.count)
    }

    /// Replays one saved input of the target named by its folder.
    static func replay(target: String, _ bytes: [UInt8]) throws {
        let dir = TempDir()
        defer { dir.remove() }
        switch target {
        case "fuzz-safetensors-header": try safetensorsHeader(bytes)
        case "fuzz-model-index": try modelIndex(bytes, in: dir)
        case "fuzz-adapter-config": try adapterConfig(bytes, in: dir)
        case "fuzz-zip": try zip(bytes, in: dir)
        case "fuzz-torch": try torch(bytes, in: dir)
        case "fuzz-pickle": try pickle(bytes)
        default: Issue.record("Fixtures/fuzz/\(target): no such fuzz target")
        }
    }

    /// Every saved input: (target folder, file name).
    static var savedInputs: [FuzzInput] {
        let root = fixture("fuzz")
        let fm = FileManager.default
        var out: [FuzzInput] = []
        for target in ((try? fm.contentsOfDirectory(atPath: root)) ?? []).sorted() {
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: root + "/" + target, isDirectory: &isDir), isDir.boolValue else { continue }
            for name in ((try? fm.contentsOfDirectory(atPath: root + "/" + target)) ?? []).sorted() {
                out.append(FuzzInput(target: target, name: name))
            }
        }
        return out
    }
}

struct FuzzInput: Sendable, CustomTestStringConvertible {
    let target: String
    let name: String
    var path: String { fixture("fuzz/\(target)/\(name)") }
    var testDescription: String { "\(target)/\(name)" }
}

@Suite("fuzz regressions: inputs the fuzzers found, replayed")
struct FuzzRegressionTests {
    @Test("every saved fuzz input is refused or accepted quickly, without a trap", arguments: FuzzReplay.savedInputs)
    func replay(_ input: FuzzInput) throws {
        let bytes = readBytes(input.path)
        let start = DispatchTime.now()
        do { try FuzzReplay.replay(target: input.target, bytes) } catch {
            // A refusal is the expected outcome; it must be one line.
            #expect(!String(describing: error).contains("\n"), "\(input.testDescription): \(error)")
        }
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e9
        #expect(seconds < 10, "\(input.testDescription) took \(seconds) s")
    }
}

@Suite("fuzz regressions: specific fixes")
struct FuzzFixTests {
    // Found by fuzz-adapter-config from a seed with a rank_pattern key: `(.*)*z` made loading the
    // adapter run for more than 100 s (exponential backtracking per module name).
    @Test("rank_pattern and alpha_pattern keys that would backtrack exponentially are refused at once")
    func costlyPatternKeys() throws {
        for key in ["(.*)*z", "((((.*)*)*)*)*!", "(a|.)*(a|.)*(a|.)*(a|.)*(a|.)*!", "(a|a)*!", "(a+)+$", ".*.*.*x", "(x{1,3}){1,9}"] {
            #expect(!AdapterSettings.isSafePattern(key), "\(key)")
        }
        for key in ["q_proj", "model.layers.0.self_attn.q_proj", ".*q_proj", "layers\\.[0-9]+\\.mlp", "(q|k)_proj", "(layers\\.)?1[0-5]\\.v_proj",
                    "model.layers.1[0-5].self_attn.v_proj", "[(*]x", "a\\(*", "(?:q|k)_proj", "down_proj.*?"] {
            #expect(AdapterSettings.isSafePattern(key), "\(key)")
        }
        let dir = TempDir()
        defer { dir.remove() }
        let start = DispatchTime.now()
        #expect(throws: InputError.self) {
            try FuzzReplay.replay(target: "fuzz-adapter-config", readBytes(fixture("fuzz/fuzz-adapter-config/rank-pattern-nested-star")))
        }
        do {
            try FuzzReplay.adapterConfig(readBytes(fixture("fuzz/fuzz-adapter-config/rank-pattern-nested-star")), in: dir)
        } catch {
            #expect(String(describing: error).contains("too costly to match"), "\(error)")
        }
        #expect(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds < 5_000_000_000)
    }
}

extension FuzzFixTests {
    // A 505-byte checkpoint whose tensor is a (100000, 100000) view with strides (0, 0) over one
    // float: it passed the bounds check (the view's last element is inside the storage) and reading
    // it tried to allocate 37 GiB (convert to-safetensors crashed with a backtrace).
    @Test("a strided view that repeats storage elements is refused when the checkpoint is opened")
    func repeatingView() throws {
        let start = DispatchTime.now()
        #expect {
            _ = try TorchCheckpoint(path: fixture("fuzz/fuzz-torch/stride-zero-40-gb-view.pt"))
        } throws: { error in
            String(describing: error).contains("repeats elements") && !String(describing: error).contains("\n")
        }
        #expect(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds < 5_000_000_000)
        // Views that only reorder elements stay readable.
        let noncontiguous = try TorchCheckpoint(path: fixture("pytorch/noncontig.pt"))
        #expect(!noncontiguous.entries.isEmpty)
    }
}

extension FuzzFixTests {
    // A 793-byte pickle: a tensor in a dict {"a": x, "b": x} nested 30 times through the memo, so
    // 2^30 paths. The walk ran to its fixed 10-million-node budget: 14 s and 1.3 GB before refusing.
    @Test("a pickle whose shared sub-objects make 2^30 paths is refused at once, within a budget its size justifies")
    func sharedSubObjects() throws {
        let start = DispatchTime.now()
        #expect {
            _ = try TorchCheckpoint(path: fixture("fuzz/fuzz-torch/shared-dicts-2-to-the-30-paths.pt"))
        } throws: { error in
            String(describing: error).contains("too large to walk")
        }
        #expect(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds < 2_000_000_000)
        // Real checkpoints, nested and shared ones included, stay within the budget.
        for name in ["adapter_model.bin", "nested.pt", "shared.pt", "dtypes.pt", "parameter.pt", "zip64.pt"] {
            #expect(throws: Never.self, "\(name)") { _ = try TorchCheckpoint(path: fixture("pytorch/" + name)) }
        }
    }
}

extension FuzzFixTests {
    // A 1.2 MB pickle (deflated to a few KB): a 1 MiB key memoized once, then SETITEM with it 50,000
    // times. Each set hashed the whole key: 20 s in a debug build, hours for a pickle near the limit.
    @Test("a long dict key set again and again is refused within a budget the pickle's size justifies")
    func repeatedLongKey() throws {
        let start = DispatchTime.now()
        #expect {
            _ = try TorchCheckpoint(path: fixture("fuzz/fuzz-torch/long-key-set-50000-times.pt"))
        } throws: { error in
            String(describing: error).contains("dict keys add up to more than")
        }
        #expect(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds < 3_000_000_000)
    }
}
