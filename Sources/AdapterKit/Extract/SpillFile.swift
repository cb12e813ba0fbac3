import Foundation

/// The factors `extract` has computed so far, in their output dtype, in an unnamed file beside OUT
/// (created and unlinked at once, so a crash leaves nothing behind): memory stays one module's
/// worth however many modules the model has, and the adapter file is then assembled by copying
/// regions of this file in the kernel.
final class SpillFile: TensorContainer, @unchecked Sendable {
    let path: String
    let format = ContainerFormat.safetensors
    private let descriptor: FileDescriptor
    private let lock = NSLock()
    private var stored: [TensorEntry] = []
    private var offsets: [String: Int] = [:]
    private var end = 0

    /// A spill file in `folder`.
    init(in folder: String) throws {
        let name = joinPath(folder, ".adapter-spill-\(getpid())-\(UUID().uuidString.prefix(8))")
        descriptor = try FileDescriptor.createScratch(name)
        FileSystem.unlinkFile(name)
        path = "(factors computed by this run)"
    }

    var entries: [TensorEntry] { lock.withLock { stored } }
    var metadataPairs: [(key: String, value: String)] { [] }
    var metadataForSafetensors: [(key: String, value: String)]? { nil }
    func entry(_ name: String) -> TensorEntry? { lock.withLock { stored.first { $0.name == name } } }
    func release(_ name: String) {}

    /// Appends `values` rounded once into `dtype` and returns the stored tensor.
    func append(_ name: String, _ values: [Double], shape: [Int], dtype: DType) throws -> TensorRef {
        var bytes = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        values.withUnsafeBufferPointer { src in
            bytes.withUnsafeMutableBytes { dst in
                if !values.isEmpty { ElementConversion.fromDouble(dtype, src.baseAddress!, dst.baseAddress!, count: values.count) }
            }
        }
        let e = TensorEntry(name: name, shape: shape, encoding: .plain(dtype), byteCount: bytes.count)
        try lock.withLock {
            try bytes.withUnsafeBytes { try descriptor.writeAll($0) }
            offsets[name] = end
            end += bytes.count
            stored.append(e)
        }
        return TensorRef(store: self, entry: e)
    }

    func region(of name: String) -> FileRegion? {
        lock.withLock {
            guard let o = offsets[name], let e = stored.first(where: { $0.name == name }) else { return nil }
            return FileRegion(descriptor: descriptor, range: o..<(o + e.byteCount))
        }
    }

    func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let r = region(of: name) else { throw TensorReadError(file: path, tensor: name, problem: "no such tensor") }
        let b = try descriptor.readBytes(count: r.range.count, at: r.range.lowerBound)
        return try b.withUnsafeBytes { try body($0) }
    }
}
