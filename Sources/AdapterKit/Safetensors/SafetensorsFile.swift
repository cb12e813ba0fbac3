/// An open safetensors file: header parsed and validated, data read only when asked.
///
/// Tensor bytes are read with `pread`, not through a memory map: a file that another process
/// truncates or rewrites while it is read (`save_pretrained` writing in place) is then a one-line
/// error, never a SIGBUS.
public final class SafetensorsFile: TensorContainer {
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
        self.entries = header.tensors.map(\.entry)
    }

    public let entries: [TensorEntry]
    public var format: ContainerFormat { .safetensors }
    public var metadataPairs: [(key: String, value: String)] { header.metadata }
    public var metadataForSafetensors: [(key: String, value: String)]? { header.hasMetadata ? header.metadata : nil }
    public func entry(_ name: String) -> TensorEntry? { header.tensor(named: name)?.entry }
    /// The header's record of a tensor, with its data offsets.
    public func info(_ name: String) -> TensorInfo? { header.tensor(named: name) }

    public func region(of name: String) -> FileRegion? {
        info(name).map { FileRegion(descriptor: descriptor, range: fileRange(of: $0)) }
    }

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

    /// Reads only bytes `range` of the tensor (checked against it), with the same file-change check.
    public func withBytes<R>(of name: String, range: Range<Int>, _ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        guard let t = info(name) else { throw TensorReadError(file: path, tensor: name, problem: "no such tensor") }
        let whole = fileRange(of: t)
        guard range.lowerBound >= 0, range.upperBound <= whole.count else {
            throw TensorReadError(file: path, tensor: name, problem: "bytes \(range) are outside its \(whole.count) bytes")
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, range.count), alignment: 64)
        defer { buffer.deallocate() }
        let target = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<range.count])
        let got = range.isEmpty ? 0 : try descriptor.read(into: target, at: whole.lowerBound + range.lowerBound)
        guard got == range.count, (try? descriptor.status().size) == fileSize else {
            throw TensorReadError(file: path, tensor: name, problem: "the file changed while being read (it was \(fileSize) bytes when opened; now \((try? descriptor.status().size).map(String.init) ?? "unreadable")); nothing was written")
        }
        return try body(UnsafeRawBufferPointer(target))
    }

    /// Nothing is held between reads.
    public func release(_ name: String) {}

    /// Asks the kernel to read the tensor ahead of use.
    public func prefetch(_ name: String) {
        if let t = info(name) { descriptor.adviseWillNeed(fileRange(of: t)) }
    }
}
