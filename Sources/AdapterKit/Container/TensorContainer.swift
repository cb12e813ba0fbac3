/// A stretch of an open file that holds a tensor's bytes exactly as they are to be written: what a
/// writer copies in the kernel (`copy_file_range` / `sendfile`) and a merge reads with `pread`.
public struct FileRegion: Sendable {
    let descriptor: FileDescriptor
    /// Byte offsets within the file.
    public let range: Range<Int>
    /// The file, for messages.
    public var path: String { descriptor.path }
}

/// The file formats tensors are read from.
public enum ContainerFormat: String, Sendable {
    case safetensors
    /// `torch.save` zip archives (read only).
    case pytorch
}

/// A file of named tensors whose bytes are read only when asked for.
///
/// Conformers: `SafetensorsFile` (reads with `pread`; every tensor is a file region) and
/// `TorchCheckpoint` (read only; materialises a tensor on request). The merge engine sees only
/// this protocol.
public protocol TensorContainer: AnyObject, Sendable {
    /// The file the tensors come from, for messages.
    var path: String { get }
    var format: ContainerFormat { get }
    /// Tensors in stored order.
    var entries: [TensorEntry] { get }
    /// File-level string metadata (`__metadata__` for safetensors).
    var metadataPairs: [(key: String, value: String)] { get }
    /// The metadata a safetensors file written from this one carries: its own for a safetensors
    /// file (nil when it has none), what torch's safetensors export writes for a PyTorch file.
    var metadataForSafetensors: [(key: String, value: String)]? { get }
    func entry(_ name: String) -> TensorEntry?
    /// Calls `body` with the tensor's little-endian, row-major bytes.
    func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
    /// Calls `body` with bytes `range` of the tensor's bytes (a block of rows of an expert factor),
    /// reading no more than that where the container can.
    func withBytes<R>(of name: String, range: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
    /// The file region holding the tensor's bytes as stored, when they are one (nil when they have
    /// to be decompressed or gathered: read them with `withBytes`).
    func region(of name: String) -> FileRegion?
    /// Asks for a tensor's bytes ahead of use.
    func prefetch(_ name: String)
    /// Lets go of memory held for the tensor after use (mapped or inflated pages).
    func release(_ name: String)
}

extension TensorContainer {
    public func prefetch(_ name: String) {}

    /// Reads the whole tensor and hands `body` the part asked for.
    public func withBytes<R>(of name: String, range: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        try withBytes(of: name) { all in
            guard range.lowerBound >= 0, range.upperBound <= all.count else {
                throw TensorReadError(file: path, tensor: name, problem: "bytes \(range) are outside its \(all.count) bytes")
            }
            return try body(UnsafeRawBufferPointer(rebasing: all[range]))
        }
    }

    /// The tensor's elements as Float32 (for adapter factors, which are small).
    public func floats(_ name: String) throws -> [Float] {
        try elements(name, as: Float.self, ElementConversion.toFloat)
    }

    /// The tensor's elements as Float64.
    public func doubles(_ name: String) throws -> [Double] {
        try elements(name, as: Double.self, ElementConversion.toDouble)
    }

    private func elements<T: BinaryFloatingPoint>(
        _ name: String, as _: T.Type, _ convert: (DType, UnsafeRawPointer, UnsafeMutablePointer<T>, Int) -> Void
    ) throws -> [T] {
        guard let t = entry(name) else { throw TensorReadError(file: path, tensor: name, problem: "no such tensor") }
        guard t.dtype.isReadableAsFloat else {
            throw TensorReadError(file: path, tensor: name, problem: "dtype \(t.dtype.rawValue) is not a floating-point type")
        }
        let n = t.elementCount
        var out = [T](repeating: 0, count: n)
        try withBytes(of: name) { raw in
            out.withUnsafeMutableBufferPointer { dst in
                if n > 0 { convert(t.dtype, raw.baseAddress!, dst.baseAddress!, n) }
            }
        }
        return out
    }
}

/// A tensor could not be read as asked.
public struct TensorReadError: Error, Sendable, CustomStringConvertible {
    public let file: String
    public let tensor: String
    public let problem: String
    public var description: String { "\(file): tensor \"\(tensor)\": \(problem)" }
}

/// Where a writer puts tensor bytes: appended in layout order, from memory or from another file's
/// region. The writer knows its layout, so it can pad or align at tensor ends where its format
/// asks for that; `finish` checks that every byte arrived.
protocol TensorFileWriter: AnyObject {
    func append(_ bytes: UnsafeRawBufferPointer) throws
    func append(_ region: FileRegion) throws
    func finish() throws
}
