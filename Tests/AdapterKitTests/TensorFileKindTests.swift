import Foundation
import Testing
@testable import AdapterKit

/// A safetensors file whose header is exactly `length` bytes (JSON padded with spaces, as the
/// format allows), holding one F32 tensor [1.5, -2].
private func safetensorsFile(headerLength length: Int, in dir: TempDir) -> String {
    let json = #"{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"format":"pt"}}"#
    precondition(length >= json.utf8.count)
    let header = json + String(repeating: " ", count: length - json.utf8.count)
    return dir.write("h\(length).safetensors", safetensorsBytes(header: header, data: floatBytes([1.5, -2])))
}

@Suite("tensor files are told apart by structure, not by their first bytes")
struct TensorFileKindTests {
    @Test("a safetensors file opens whatever the low bytes of its header length are (every residue mod 256)")
    func everyResidue() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // 0x180 … 0x27F covers every low byte; 0x4B50 makes the first two bytes "PK", 0x0280 makes them a pickle's 0x80 0x02.
        for length in Array(0x180..<0x280) + [0x4B50, 0x0280, 0x0380, 0x1080] {
            let path = safetensorsFile(headerLength: length, in: dir)
            let store = try openTensorFile(path)
            #expect(store is SafetensorsFile, "header length \(length)")
            #expect(try store.floats("t") == [1.5, -2], "header length \(length)")
            #expect(try Checkpoint(path: path).tensorNames == ["t"])
        }
    }

    @Test("a file written by our writer whose header length starts with 0x80 opens as an adapter")
    func writerOutput() throws {
        let dir = TempDir()
        defer { dir.remove() }
        // Pad the metadata until the writer's 8-aligned header length has low byte 0x80.
        var pad = ""
        var path = ""
        for _ in 0..<200 {
            path = dir.file("k\(pad.count).safetensors")
            let layout = try SafetensorsLayout(tensors: [TensorSpec(name: "lora_unet_x.lora_down.weight", dtype: .f32, shape: [1, 2]),
                                                         TensorSpec(name: "lora_unet_x.lora_up.weight", dtype: .f32, shape: [2, 1])],
                                               metadata: [("pad", pad)])
            if layout.headerBytes[0] == 0x80 {
                try writeSafetensors(path, [(name: "lora_unet_x.lora_down.weight", dtype: .f32, shape: [1, 2], bytes: floatBytes([1, 2])),
                                            (name: "lora_unet_x.lora_up.weight", dtype: .f32, shape: [2, 1], bytes: floatBytes([3, 4]))],
                                     metadata: [("pad", pad)])
                break
            }
            pad += "xxxxxxxx"
        }
        #expect(readBytes(path).first == 0x80)
        let adapter = try Adapter(path: path)
        #expect(adapter.format == .kohya)
        #expect(adapter.modules.count == 1)
    }

    @Test("zip checkpoints and legacy pickles are still recognised")
    func torchFiles() throws {
        #expect(try openTensorFile(fixture("pytorch/adapter_model.bin")) is TorchCheckpoint)
        let legacy = #expect(throws: InputError.self) { try openTensorFile(fixture("pytorch/legacy.pt")) }
        #expect(legacy?.problem.contains("legacy torch.save format") == true)
        let truncated = #expect(throws: (any Error).self) { try openTensorFile(fixture("pytorch/hostile_truncated.pt")) }
        #expect(String(describing: truncated!).contains("no end-of-central-directory record"))
    }

    @Test("a file that is none of them says which it is not, in one line")
    func none() throws {
        let dir = TempDir()
        defer { dir.remove() }
        for (name, bytes) in [("short", [UInt8](repeating: 1, count: 5)), ("text", Array("hello world, not tensors".utf8)),
                              ("pickle", [0x80, 0x02, 0x7D, 0x71, 0x00, 0x2E] + [UInt8](repeating: 0, count: 20)),
                              ("long", safetensorsBytes(header: "{}", declaredLength: 1 << 40))] {
            let path = dir.write(name, bytes)
            let error = #expect(throws: (any Error).self) { try openTensorFile(path) }
            let text = String(describing: error!)
            #expect(text.hasPrefix(path + ": "), "\(text)")
            #expect(text.contains("nor is it a PyTorch zip"), "\(text)")
            #expect(text.contains("legacy torch.save pickle"), "\(text)")
            #expect(!text.contains("\n"))
        }
    }
}
