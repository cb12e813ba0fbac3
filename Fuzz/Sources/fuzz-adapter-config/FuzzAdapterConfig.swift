import AdapterKit
import FuzzSupport

/// The first byte picks a layout, the rest is its config file, beside a real adapter's tensors:
/// 0 PEFT / mlx (`adapter_config.json`), 1 PaddleNLP (`lora_config.json`), 2 MyTransformers (`config.json`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzAdapterConfig(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    Scratch.install(fixture: "adapters/moslora-original/adapter_model.safetensors", as: "adapter_model.safetensors", in: "peft")
    Scratch.install(fixture: "adapters/mlx/adapters.safetensors", as: "adapters.safetensors", in: "peft")
    Scratch.install(fixture: "adapters/paddle/peft_model.safetensors", as: "peft_model.safetensors", in: "paddle")
    Scratch.install(fixture: "adapters/mytransformers/final.safetensors", as: "final.safetensors", in: "mytransformers")
    withInput(data, size) { bytes in
        guard let selector = bytes.first else { return }
        let config = UnsafeRawBufferPointer(rebasing: bytes.dropFirst())
        let (folder, name) = [("peft", "adapter_config.json"), ("paddle", "lora_config.json"), ("mytransformers", "config.json")][Int(selector) % 3]
        _ = Scratch.write(config, as: name, in: folder)
        if let adapter = try? Adapter(path: Scratch.folder + "/" + folder) {
            // The report walks every module and scale, as `adapter inspect` does.
            _ = adapter.modules.map { ($0.name, $0.rank) }
        }
    }
    return 0
}

@main
enum FuzzAdapterConfig {
    static func main() { runLibFuzzer(fuzzAdapterConfig) }
}
