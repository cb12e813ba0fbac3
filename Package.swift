// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "adapter",
    products: [
        .library(name: "AdapterKit", targets: ["AdapterKit"]),
        .executable(name: "adapter", targets: ["AdapterCLI"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // zlib: inflate and CRC-32 for PyTorch zip checkpoints (Debian: zlib1g-dev).
        .systemLibrary(
            name: "CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        // The fused merge kernel, with an AVX2/FMA path chosen at run time.
        .target(name: "CMergeKernel"),
        // Copies from memory-mapped input that survive the file shrinking (SIGBUS becomes an error).
        .target(name: "CGuardedRead"),
        // Float64 GEMM, LU and bidiagonalisation for large mixers, AVX2/FMA chosen at run time.
        .target(name: "CLinearAlgebra"),
        // SHA-256 for the manifests of split merges, with the x86 SHA extensions chosen at run time.
        .target(name: "CHash"),
        .target(
            name: "AdapterKit",
            dependencies: ["CZlib", "CMergeKernel", "CGuardedRead", "CLinearAlgebra", "CHash"],
            // The fault-injection hooks (System/TestHooks.swift) exist in debug builds only.
            swiftSettings: [.define("ADAPTER_TEST_HOOKS", .when(configuration: .debug))]
        ),
        .executableTarget(
            name: "AdapterCLI",
            dependencies: [
                "AdapterKit",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .executableTarget(
            name: "adapter-kernel-bench",
            dependencies: ["AdapterKit"],
            path: "Benchmarks/KernelBench"
        ),
        // What both test targets share: fixtures, temporary folders, running programs.
        .target(name: "AdapterTestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "AdapterKitTests", dependencies: ["AdapterKit", "AdapterTestSupport"]),
        // Runs the built binary; the library is used only to make and read test files.
        .testTarget(name: "AdapterCLITests", dependencies: ["AdapterKit", "AdapterTestSupport"]),
    ],
    swiftLanguageModes: [.v6]
)
