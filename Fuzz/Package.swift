// swift-tools-version:6.0
// libFuzzer targets for AdapterKit's parsers. A package of its own so that the main build and CI
// never compile them; build and run with `Fuzz/run.sh` (it passes -sanitize=fuzzer,address).
import Foundation
import PackageDescription

// The root package's identity is its folder's name, whatever the checkout is called.
let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().lastPathComponent
let adapterKit = Target.Dependency.product(name: "AdapterKit", package: root)

let fuzzTargets = [
    "fuzz-safetensors-header",
    "fuzz-model-index",
    "fuzz-adapter-config",
    "fuzz-zip",
    "fuzz-torch",
    "fuzz-pickle",
    "fuzz-gguf",
]

let package = Package(
    name: "adapter-fuzz",
    dependencies: [.package(path: "..")],
    targets: [
        .target(name: "CLibFuzzer"),
        .target(name: "FuzzSupport", dependencies: ["CLibFuzzer", adapterKit]),
    ] + fuzzTargets.map { name in
        .executableTarget(name: name, dependencies: ["FuzzSupport", adapterKit])
    },
    swiftLanguageModes: [.v6]
)
