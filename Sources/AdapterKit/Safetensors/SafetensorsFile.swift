/// A source of named tensors whose bytes are read only when asked for.
///
/// Safetensors files map their data; PyTorch checkpoints materialise a tensor on request.
public protocol TensorStore: AnyObject, Sendable {
    /// The file the tensors come from, for messages.
    var path: String { get }
    /// Tensors in stored order.
    var tensorInfos: [TensorInfo] { get }
    /// File-level string metadata (`__metadata__` for safetensors).
    var metadataPairs: [(key: String, value: String)] { get }
    func info(_ name: String) -> TensorInfo?
    /// Calls `body` with the tensor's little-endian, row-major bytes.
    func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R
    /// Lets go of memory held for the tensor after use (mapped pages).
    func release(_ name: String)
}

extension TensorStore {
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
        guard let t = info(name) else { throw TensorReadError(file: path, tensor: name, problem: "no such tensor") }
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

/// An open safetensors file: header parsed and validated, data read only when asked.
///
/// Tensor bytes are read with `pread`, not through a memory map: a file that another process
/// truncates or rewrites while it is read (`save_pretrained` writing in place) is then a one-line
/// error, never a SIGBUS.
public final class SafetensorsFile: TensorStore {
    public let path: String
    public let header: SafetensorsHeader
    public let fileSize: Int
    let descriptor: FileDescriptor

    /// Opens and validates `path`. Reads only the header; costs milliseconds for any file size.
    public init(path: String) throws {
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.openForReading(path)
        } catch let e as SystemError {
            throw SafetensorsError(file: path, rule: .unreadable, detail: e.reason)
        }
        let status = try fd.status()
        guard status.isRegular else { throw SafetensorsError(file: path, rule: .unreadable, detail: "not a regular file") }
        self.path = path
        self.fileSize = status.size
        self.descriptor = fd
        let prefix = try fd.readBytes(count: 8, at: 0)
        self.header = try SafetensorsHeader.parse(file: path, fileSize: status.size, prefix: prefix) { n in
            try fd.readBytes(count: n, at: 8)
        }
    }

    public var tensorInfos: [TensorInfo] { header.tensors }
    public var metadataPairs: [(key: String, value: String)] { header.metadata }
    public func info(_ name: String) -> TensorInfo? { header.tensor(named: name) }

    /// The byte range of a tensor within the file.
    public func fileRange(of t: TensorInfo) -> Range<Int> {
        (header.dataStart + t.dataOffsets.lowerBound)..<(header.dataStart + t.dataOffsets.upperBound)
    }

    /// Reads the tensor into a buffer valid during `body`. A file that is shorter than when it was
    /// opened, or whose size changed, is refused: it is being rewritten.
    public func withBytes<R>(of name: String, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let t = info(name) else { throw TensorReadError(file: path, tensor: name, problem: "no such tensor") }
        let range = fileRange(of: t)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, range.count), alignment: 64)
        defer { buffer.deallocate() }
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<range.count])
        let got = range.isEmpty ? 0 : try descriptor.read(into: target, at: range.lowerBound)
        guard got == range.count, (try? descriptor.status().size) == fileSize else {
            throw TensorReadError(file: path, tensor: name, problem: "the file changed while being read (it was \(fileSize) bytes when opened; now \((try? descriptor.status().size).map(String.init) ?? "unreadable")); nothing was written")
        }
        return try body(UnsafeRawBufferPointer(target))
    }

    /// Nothing is held between reads.
    public func release(_ name: String) {}

    /// Asks the kernel to read a range ahead of use.
    public func prefetch(_ t: TensorInfo) {
        descriptor.adviseWillNeed(fileRange(of: t))
    }

    /// Nothing is held between reads.
    public func release(_ t: TensorInfo) {}
}
