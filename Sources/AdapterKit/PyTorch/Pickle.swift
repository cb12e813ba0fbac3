/// Why a pickle was refused: the byte where the interpreter stopped and the reason, in one line.
struct PickleError: Error, Sendable, CustomStringConvertible {
    let offset: Int
    let problem: String

    var description: String { "pickle byte \(offset): \(problem)" }
}

/// The kind of storage a persistent id names: a legacy typed storage (`torch.FloatStorage`) or
/// `torch.storage.UntypedStorage` (bytes, with the dtype given to `_rebuild_tensor_v3`).
enum TorchStorageKind: Sendable, Hashable {
    case typed(DType)
    case untyped
}

/// A storage named by a persistent id `('storage', type, key, location, numel)`.
struct TorchStorageReference: Sendable, Hashable {
    let key: String
    let kind: TorchStorageKind
    let location: String
    /// Elements of the storage's type (bytes for untyped storages).
    let count: Int
}

/// A tensor as `_rebuild_tensor_v2/v3` describe it: a strided view of one storage.
struct TorchTensorReference: Sendable, Hashable {
    let storage: TorchStorageReference
    let dtype: DType
    /// In elements of `dtype`.
    let storageOffset: Int
    let shape: [Int]
    let stride: [Int]
}

/// A mutable pickle list; a class because pickle ops mutate lists after they are memoized.
final class PickleList {
    var items: [PickleValue] = []
}

/// A mutable pickle dict keeping insertion order (OrderedDict and plain dicts alike).
final class PickleDict {
    var items: [(key: PickleValue, value: PickleValue)] = []
    private var stringIndex: [String: Int] = [:]
    private var intIndex: [Int: Int] = [:]

    func set(_ key: PickleValue, _ value: PickleValue) throws(PickleDictKeyError) {
        let slot: Int?
        switch key {
        case .string(let s): slot = stringIndex[s]
        case .int(let i): slot = intIndex[i]
        default: throw PickleDictKeyError(kind: key.kindName)
        }
        if let slot {
            items[slot].value = value
            return
        }
        switch key {
        case .string(let s): stringIndex[s] = items.count
        case .int(let i): intIndex[i] = items.count
        default: break
        }
        items.append((key, value))
    }
}

struct PickleDictKeyError: Error {
    let kind: String
}

/// An allow-listed global: the only things a checkpoint pickle may name.
enum PickleGlobal: Equatable {
    case orderedDict
    case rebuildTensor, rebuildTensorV2, rebuildTensorV3
    case rebuildParameter, rebuildParameterWithState
    case torchSize
    case storageType(TorchStorageKind)
    case dtype(DType)

    static func lookup(module: String, name: String) -> PickleGlobal? {
        switch (module, name) {
        case ("collections", "OrderedDict"): return .orderedDict
        case ("torch._utils", "_rebuild_tensor"): return .rebuildTensor
        case ("torch._utils", "_rebuild_tensor_v2"): return .rebuildTensorV2
        case ("torch._utils", "_rebuild_tensor_v3"): return .rebuildTensorV3
        case ("torch._utils", "_rebuild_parameter"): return .rebuildParameter
        case ("torch._utils", "_rebuild_parameter_with_state"): return .rebuildParameterWithState
        case ("torch", "Size"): return .torchSize
        case ("torch.storage", "UntypedStorage"), ("torch", "UntypedStorage"): return .storageType(.untyped)
        case ("torch", _):
            if let d = storageTypes[name] { return .storageType(.typed(d)) }
            if let d = dtypes[name] { return .dtype(d) }
            return nil
        default: return nil
        }
    }

    /// torch's legacy storage classes, by element type.
    static let storageTypes: [String: DType] = [
        "FloatStorage": .f32, "DoubleStorage": .f64, "HalfStorage": .f16, "BFloat16Storage": .bf16,
        "LongStorage": .i64, "IntStorage": .i32, "ShortStorage": .i16, "CharStorage": .i8,
        "ByteStorage": .u8, "BoolStorage": .bool, "ComplexFloatStorage": .c64,
    ]

    /// torch dtype objects (pickled as globals `torch.<name>`), for `_rebuild_tensor_v3`.
    static let dtypes: [String: DType] = [
        "float32": .f32, "float": .f32, "float64": .f64, "double": .f64, "float16": .f16, "half": .f16,
        "bfloat16": .bf16, "int64": .i64, "long": .i64, "int32": .i32, "int": .i32, "int16": .i16,
        "short": .i16, "int8": .i8, "uint8": .u8, "bool": .bool, "uint16": .u16, "uint32": .u32,
        "uint64": .u64, "complex64": .c64, "cfloat": .c64, "float8_e4m3fn": .f8E4M3, "float8_e5m2": .f8E5M2,
        "float8_e4m3fnuz": .f8E4M3FNUZ, "float8_e5m2fnuz": .f8E5M2FNUZ, "float8_e8m0fnu": .f8E8M0,
    ]
}

/// A value the interpreter builds. Nothing here can run code: globals are allow-listed names.
indirect enum PickleValue {
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case bytes([UInt8])
    /// `depth` is the tuple nesting below and including this one, kept so values stay shallow.
    case tuple([PickleValue], depth: Int)
    case list(PickleList)
    case dict(PickleDict)
    case global(PickleGlobal)
    case storage(TorchStorageReference)
    case tensor(TorchTensorReference)

    var kindName: String {
        switch self {
        case .none: "None"
        case .bool: "bool"
        case .int: "int"
        case .float: "float"
        case .string: "str"
        case .bytes: "bytes"
        case .tuple: "tuple"
        case .list: "list"
        case .dict: "dict"
        case .global: "global"
        case .storage: "storage"
        case .tensor: "tensor"
        }
    }
}

/// A pickle interpreter for the subset torch.save writes (protocols 2 to 5), with an allow-list of
/// globals and limits on stack, memo and nesting, so a hostile file can neither run code nor exhaust memory.
struct PickleMachine {
    static let maxStack = 1_000_000
    static let maxMarks = 10_000
    static let maxMemo = 1_000_000
    static let maxStringBytes = 64 << 20
    static let maxDims = 64
    /// Nested tuples are values: releasing a deep one recurses, so depth is capped where they are made.
    static let maxTupleDepth = 256

    private let bytes: [UInt8]
    private var pos = 0
    private var opStart = 0
    private var stack: [PickleValue] = []
    private var marks: [Int] = []
    private var memo: [Int: PickleValue] = [:]
    /// Every mutable container made, so cycles a hostile pickle builds can be broken afterwards.
    private var containers: [AnyObject] = []
    /// Bytes of dict keys hashed so far: a long key memoized once and set again and again would
    /// otherwise cost its length for every 4 pickle bytes (a 1.2 MB pickle ran for 20 s).
    private var keyBytes = 0

    init(_ bytes: [UInt8]) {
        self.bytes = bytes
    }

    /// Runs the pickle and returns the value STOP leaves. Call `breakCycles` when done with it.
    mutating func run() throws(PickleError) -> PickleValue {
        while true {
            opStart = pos
            let op = try readByte()
            switch op {
            case 0x80: // PROTO
                let v = try readByte()
                guard (2...5).contains(v) else { throw fail("pickle protocol \(v) is not supported (torch writes 2 to 5)") }
            case 0x95: // FRAME: a length hint; the frame's opcodes follow inline
                let n = try readUInt(8)
                guard n <= bytes.count - pos else { throw fail("a frame of \(n) bytes runs past the end of the pickle") }
            case 0x2e: // STOP
                guard marks.isEmpty else { throw fail("STOP inside an unclosed MARK") }
                guard stack.count == 1, let v = stack.last else { throw fail("STOP with \(stack.count) values on the stack instead of 1") }
                return v
            case 0x28: // MARK
                guard marks.count < Self.maxMarks else { throw fail("more than \(Self.maxMarks) nested MARKs") }
                marks.append(stack.count)
            case 0x29: try push(.tuple([], depth: 1)) // EMPTY_TUPLE
            case 0x85: try push(tuple(popN(1)))
            case 0x86: try push(tuple(popN(2)))
            case 0x87: try push(tuple(popN(3)))
            case 0x74: try push(tuple(popMark())) // TUPLE
            case 0x5d: try push(.list(newList())) // EMPTY_LIST
            case 0x6c: // LIST
                let items = try popMark()
                let l = newList()
                l.items = items
                try push(.list(l))
            case 0x61: // APPEND
                let v = try pop()
                try appendTo(top(), [v])
            case 0x65: // APPENDS
                let items = try popMark()
                try appendTo(top(), items)
            case 0x7d: try push(.dict(newDict())) // EMPTY_DICT
            case 0x64: // DICT
                let items = try popMark()
                let d = newDict()
                try setItems(d, items)
                try push(.dict(d))
            case 0x73: // SETITEM
                let pair = try popN(2)
                guard case .dict(let d) = try top() else { throw fail("SETITEM on a \(try top().kindName), not a dict") }
                try setItems(d, pair)
            case 0x75: // SETITEMS
                let items = try popMark()
                guard case .dict(let d) = try top() else { throw fail("SETITEMS on a \(try top().kindName), not a dict") }
                try setItems(d, items)
            case 0x4e: try push(.none)
            case 0x88: try push(.bool(true))
            case 0x89: try push(.bool(false))
            case 0x4b: try push(.int(try readUInt(1)))
            case 0x4d: try push(.int(try readUInt(2)))
            case 0x4a: try push(.int(Int(Int32(truncatingIfNeeded: try readUInt(4)))))
            case 0x8a: try push(.int(try readLong(try readUInt(1))))
            case 0x8b: try push(.int(try readLong(try readUInt(4))))
            case 0x47: // BINFLOAT: big-endian IEEE double
                var v: UInt64 = 0
                for _ in 0..<8 { v = v << 8 | UInt64(try readByte()) }
                try push(.float(Double(bitPattern: v)))
            case 0x58: try push(.string(try readString(try readUInt(4))))
            case 0x8c: try push(.string(try readString(try readUInt(1))))
            case 0x8d: try push(.string(try readString(try readUInt(8))))
            case 0x42: try push(.bytes(try readBytes(try readUInt(4))))
            case 0x43: try push(.bytes(try readBytes(try readUInt(1))))
            case 0x8e: try push(.bytes(try readBytes(try readUInt(8))))
            case 0x71: try put(try readUInt(1))
            case 0x72: try put(try readUInt(4))
            case 0x94: try put(memo.count)
            case 0x68: try get(try readUInt(1))
            case 0x6a: try get(try readUInt(4))
            case 0x63: // GLOBAL
                let module = try readLine()
                let name = try readLine()
                try push(.global(try resolve(module, name)))
            case 0x93: // STACK_GLOBAL
                let pair = try popN(2)
                guard case .string(let module) = pair[0], case .string(let name) = pair[1] else {
                    throw fail("STACK_GLOBAL needs two strings, got \(pair[0].kindName) and \(pair[1].kindName)")
                }
                try push(.global(try resolve(module, name)))
            case 0x52: // REDUCE
                let args = try pop()
                let callable = try pop()
                try push(try call(callable, args))
            case 0x81: // NEWOBJ
                let args = try pop()
                let cls = try pop()
                guard case .global(.orderedDict) = cls, case .tuple(let a, _) = args, a.isEmpty else {
                    throw fail("refuses NEWOBJ on \(cls.kindName): only an empty collections.OrderedDict may be created")
                }
                try push(.dict(newDict()))
            case 0x62: // BUILD
                let state = try pop()
                switch try top() {
                case .dict:
                    // OrderedDict state is its attributes (torch's `_metadata`); the items are unaffected.
                    guard case .dict = state else {
                        if case .none = state { break }
                        throw fail("refuses BUILD on a dict with a \(state.kindName) state")
                    }
                default:
                    throw fail("refuses BUILD on a \(try top().kindName): it would set attributes of an object")
                }
            case 0x51: // BINPERSID
                try push(.storage(try persistentLoad(try pop())))
            case 0x30: _ = try pop() // POP
            case 0x31: _ = try popMark() // POP_MARK
            case 0x32: try push(try top()) // DUP
            case 0x69: // INST: imports and calls in one opcode
                let module = try readLine()
                let name = try readLine()
                throw fail("refuses INST of \(globalName(module, name)): the pickle would import and call it")
            case 0x6f: throw fail("refuses OBJ: the pickle would call a class")
            case 0x92: throw fail("refuses NEWOBJ_EX: the pickle would call a class")
            case 0x82, 0x83, 0x84: throw fail("refuses EXT opcodes: they import globals from the copyreg registry")
            case 0x50: throw fail("refuses PERSID: text persistent ids are not written by torch")
            default:
                throw fail("unsupported pickle opcode 0x\(String(op, radix: 16)) (not written by torch.save for tensors)")
            }
        }
    }

    /// Empties every container, so reference cycles built by a hostile pickle do not leak.
    mutating func breakCycles() {
        for c in containers {
            if let l = c as? PickleList { l.items = [] }
            if let d = c as? PickleDict { d.items = [] }
        }
        containers = []
        memo = [:]
        stack = []
    }

    // MARK: - Globals and calls

    private func resolve(_ module: String, _ name: String) throws(PickleError) -> PickleGlobal {
        guard let g = PickleGlobal.lookup(module: module, name: name) else {
            throw fail("refuses global \(globalName(module, name)): only collections.OrderedDict, torch storage types, dtypes and torch._utils tensor rebuilders are allowed")
        }
        return g
    }

    private mutating func call(_ callable: PickleValue, _ args: PickleValue) throws(PickleError) -> PickleValue {
        guard case .global(let g) = callable else { throw fail("refuses REDUCE on a \(callable.kindName): only allow-listed globals may be called") }
        guard case .tuple(let a, _) = args else { throw fail("REDUCE arguments are a \(args.kindName), not a tuple") }
        switch g {
        case .orderedDict:
            let d = newDict()
            if let first = a.first {
                guard a.count == 1 else { throw fail("OrderedDict takes at most one argument") }
                let pairs: [PickleValue]
                switch first {
                case .list(let l): pairs = l.items
                case .tuple(let t, _): pairs = t
                default: throw fail("OrderedDict of a \(first.kindName) is not supported")
                }
                for p in pairs {
                    guard case .tuple(let kv, _) = p, kv.count == 2 else { throw fail("OrderedDict items must be (key, value) pairs") }
                    try setItems(d, kv)
                }
            }
            return .dict(d)
        case .torchSize:
            guard a.count == 1, case .tuple = a[0] else { throw fail("torch.Size takes one tuple") }
            return a[0]
        case .rebuildTensor, .rebuildTensorV2:
            guard a.count >= 4 else { throw fail("_rebuild_tensor needs storage, offset, size and stride, got \(a.count) arguments") }
            guard case .storage(let s) = a[0] else { throw fail("_rebuild_tensor's storage is a \(a[0].kindName)") }
            guard case .typed(let dtype) = s.kind else { throw fail("_rebuild_tensor_v2 over an untyped storage has no dtype") }
            return .tensor(try tensor(s, dtype, a[1], a[2], a[3]))
        case .rebuildTensorV3:
            guard a.count >= 7 else { throw fail("_rebuild_tensor_v3 needs 7 arguments, got \(a.count)") }
            guard case .storage(let s) = a[0] else { throw fail("_rebuild_tensor_v3's storage is a \(a[0].kindName)") }
            guard case .global(.dtype(let dtype)) = a[6] else { throw fail("_rebuild_tensor_v3's dtype is a \(a[6].kindName)") }
            if case .typed(let d) = s.kind, d != dtype {
                throw fail("_rebuild_tensor_v3 asks for \(dtype.rawValue) over a \(d.rawValue) storage")
            }
            return .tensor(try tensor(s, dtype, a[1], a[2], a[3]))
        case .rebuildParameter, .rebuildParameterWithState:
            guard let first = a.first, case .tensor = first else { throw fail("_rebuild_parameter needs a tensor") }
            return first
        case .storageType, .dtype:
            throw fail("refuses to call a torch type or dtype: it is only valid inside a persistent id or as an argument")
        }
    }

    private func tensor(_ s: TorchStorageReference, _ dtype: DType, _ offset: PickleValue, _ size: PickleValue,
                        _ stride: PickleValue) throws(PickleError) -> TorchTensorReference {
        guard case .int(let o) = offset, o >= 0 else { throw fail("a tensor's storage offset is not a non-negative int") }
        let shape = try intTuple(size, "size")
        let strides = try intTuple(stride, "stride")
        guard shape.count == strides.count else { throw fail("a tensor has \(shape.count) sizes but \(strides.count) strides") }
        return TorchTensorReference(storage: s, dtype: dtype, storageOffset: o, shape: shape, stride: strides)
    }

    private func intTuple(_ v: PickleValue, _ what: String) throws(PickleError) -> [Int] {
        guard case .tuple(let items, _) = v else { throw fail("a tensor's \(what) is a \(v.kindName), not a tuple") }
        guard items.count <= Self.maxDims else { throw fail("a tensor has \(items.count) dimensions, more than \(Self.maxDims)") }
        var out: [Int] = []
        for item in items {
            guard case .int(let i) = item, i >= 0 else { throw fail("a tensor's \(what) holds a value that is not a non-negative int") }
            out.append(i)
        }
        return out
    }

    private func persistentLoad(_ pid: PickleValue) throws(PickleError) -> TorchStorageReference {
        guard case .tuple(let t, _) = pid, t.count == 5, case .string("storage") = t[0] else {
            throw fail("a persistent id is not ('storage', type, key, location, numel)")
        }
        guard case .global(.storageType(let kind)) = t[1] else { throw fail("a persistent id names a \(t[1].kindName), not a torch storage type") }
        guard case .string(let key) = t[2] else { throw fail("a storage key is a \(t[2].kindName), not a string") }
        guard case .string(let location) = t[3] else { throw fail("a storage location is a \(t[3].kindName), not a string") }
        guard case .int(let n) = t[4], n >= 0 else { throw fail("a storage size is not a non-negative int") }
        return TorchStorageReference(key: key, kind: kind, location: location, count: n)
    }

    /// `module.name` as Python spells it, quoted only when it holds characters that would break the line.
    private func globalName(_ module: String, _ name: String) -> String {
        let plain = module + "." + name
        let quoted = quotedForMessage(plain)
        return quoted == "\"" + plain + "\"" ? plain : quoted
    }

    // MARK: - Stack, memo, containers

    private func tuple(_ items: [PickleValue]) throws(PickleError) -> PickleValue {
        var depth = 1
        for case .tuple(_, let d) in items { depth = max(depth, d + 1) }
        guard depth <= Self.maxTupleDepth else { throw fail("tuples nest deeper than \(Self.maxTupleDepth) levels") }
        return .tuple(items, depth: depth)
    }

    private func fail(_ problem: String) -> PickleError { PickleError(offset: opStart, problem: problem) }

    private mutating func push(_ v: PickleValue) throws(PickleError) {
        guard stack.count < Self.maxStack else { throw fail("the stack grows past \(Self.maxStack) values") }
        stack.append(v)
    }

    private mutating func pop() throws(PickleError) -> PickleValue {
        guard let v = stack.last, stack.count > (marks.last ?? 0) else { throw fail("the stack is empty") }
        stack.removeLast()
        return v
    }

    private func top() throws(PickleError) -> PickleValue {
        guard let v = stack.last, stack.count > (marks.last ?? 0) else { throw fail("the stack is empty") }
        return v
    }

    private mutating func popN(_ n: Int) throws(PickleError) -> [PickleValue] {
        guard stack.count - (marks.last ?? 0) >= n else { throw fail("the stack holds fewer than \(n) values") }
        let items = Array(stack[(stack.count - n)...])
        stack.removeLast(n)
        return items
    }

    private mutating func popMark() throws(PickleError) -> [PickleValue] {
        guard let m = marks.popLast() else { throw fail("no MARK to pop to") }
        let items = Array(stack[m...])
        stack.removeSubrange(m...)
        return items
    }

    private mutating func newList() -> PickleList {
        let l = PickleList()
        containers.append(l)
        return l
    }

    private mutating func newDict() -> PickleDict {
        let d = PickleDict()
        containers.append(d)
        return d
    }

    private func appendTo(_ target: PickleValue, _ items: [PickleValue]) throws(PickleError) {
        guard case .list(let l) = target else { throw fail("APPEND to a \(target.kindName), not a list") }
        guard l.items.count <= Self.maxStack - items.count else { throw fail("a list grows past \(Self.maxStack) items") }
        l.items.append(contentsOf: items)
    }

    private mutating func setItems(_ d: PickleDict, _ items: [PickleValue]) throws(PickleError) {
        guard items.count % 2 == 0 else { throw fail("SETITEMS with an odd number of values") }
        guard d.items.count <= Self.maxStack - items.count / 2 else { throw fail("a dict grows past \(Self.maxStack) items") }
        var i = 0
        while i < items.count {
            if case .string(let key) = items[i] {
                keyBytes += key.utf8.count
                guard keyBytes <= 16 * bytes.count + (1 << 20) else {
                    throw fail("dict keys add up to more than 16 times the pickle's size (a long key set again and again)")
                }
            }
            do {
                try d.set(items[i], items[i + 1])
            } catch {
                throw fail("a dict key is a \(error.kind); only str and int keys are supported")
            }
            i += 2
        }
    }

    private mutating func put(_ index: Int) throws(PickleError) {
        guard memo[index] != nil || memo.count < Self.maxMemo else { throw fail("the memo grows past \(Self.maxMemo) entries") }
        memo[index] = try top()
    }

    private mutating func get(_ index: Int) throws(PickleError) {
        guard let v = memo[index] else { throw fail("memo entry \(index) is read before it is written") }
        try push(v)
    }

    // MARK: - Reading bytes

    private mutating func readByte() throws(PickleError) -> UInt8 {
        guard pos < bytes.count else { throw PickleError(offset: pos, problem: "the pickle ends before STOP (truncated)") }
        defer { pos += 1 }
        return bytes[pos]
    }

    /// A little-endian unsigned integer of `n` bytes that must fit in Int.
    private mutating func readUInt(_ n: Int) throws(PickleError) -> Int {
        guard n <= bytes.count - pos else { throw PickleError(offset: pos, problem: "the pickle ends inside an argument (truncated)") }
        var v: UInt64 = 0
        for i in 0..<n { v |= UInt64(bytes[pos + i]) << (8 * UInt64(i)) }
        pos += n
        guard v <= UInt64(Int.max) else { throw fail("a length of \(v) is too large") }
        return Int(v)
    }

    /// LONG1/LONG4: little-endian two's complement of `n` bytes; only values that fit in 64 bits.
    private mutating func readLong(_ n: Int) throws(PickleError) -> Int {
        guard n <= 8 else { throw fail("an integer of \(n) bytes is too large") }
        guard n <= bytes.count - pos else { throw PickleError(offset: pos, problem: "the pickle ends inside an argument (truncated)") }
        guard n > 0 else { return 0 }
        var v: UInt64 = 0
        for i in 0..<n { v |= UInt64(bytes[pos + i]) << (8 * UInt64(i)) }
        if n < 8, bytes[pos + n - 1] & 0x80 != 0 { v |= ~UInt64(0) << (8 * UInt64(n)) }
        pos += n
        return Int(Int64(bitPattern: v))
    }

    private mutating func readBytes(_ n: Int) throws(PickleError) -> [UInt8] {
        guard n <= Self.maxStringBytes else { throw fail("a string of \(n) bytes is longer than the \(Self.maxStringBytes)-byte limit") }
        guard n <= bytes.count - pos else { throw fail("a string of \(n) bytes runs past the end of the pickle (truncated)") }
        defer { pos += n }
        return Array(bytes[pos..<(pos + n)])
    }

    private mutating func readString(_ n: Int) throws(PickleError) -> String {
        let b = try readBytes(n)
        guard let s = String(validating: b, as: UTF8.self) else { throw fail("a string is not valid UTF-8") }
        return s
    }

    /// A newline-terminated ASCII line (GLOBAL and INST arguments), at most 256 bytes.
    private mutating func readLine() throws(PickleError) -> String {
        var line: [UInt8] = []
        while true {
            let b = try readByte()
            if b == 0x0a { break }
            guard line.count < 256 else { throw fail("a global name is longer than 256 bytes") }
            line.append(b)
        }
        guard let s = String(validating: line, as: UTF8.self) else { throw fail("a global name is not valid UTF-8") }
        return s
    }
}
