import Foundation
import Testing
@testable import AdapterKit

/// Opens a file made of `header` and `data`, returning the refusal rule or nil when accepted.
private func outcome(header: String, data: [UInt8] = [], declaredLength: UInt64? = nil) -> SafetensorsError.Rule? {
    let dir = TempDir()
    defer { dir.remove() }
    let path = dir.write("t.safetensors", safetensorsBytes(header: header, data: data, declaredLength: declaredLength))
    do {
        _ = try SafetensorsFile(path: path)
        return nil
    } catch let e as SafetensorsError {
        return e.rule
    } catch {
        Issue.record("unexpected error type: \(error)")
        return nil
    }
}

private func openBytes(_ bytes: [UInt8]) throws -> SafetensorsFile {
    let dir = TempDir()
    defer { dir.remove() }
    return try SafetensorsFile(path: dir.write("t.safetensors", bytes))
}

private let oneF32 = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#

@Suite("safetensors reader: formats.md §1 rules")
struct SafetensorsReaderRuleTests {
    @Test("rule 1: a file shorter than 8 bytes is refused as header too small")
    func tooSmall() throws {
        for n in 0..<8 {
            #expect(throws: SafetensorsError.self) { try openBytes([UInt8](repeating: 0, count: n)) }
            do { _ = try openBytes([UInt8](repeating: 0, count: n)) } catch let e as SafetensorsError {
                #expect(e.rule == .headerTooSmall)
            }
        }
    }

    @Test("rule 2: N above 100,000,000 is too large, exactly 100,000,000 is allowed")
    func tooLarge() {
        #expect(outcome(header: "{}", declaredLength: 100_000_001) == .headerTooLarge)
        #expect(outcome(header: "{}", declaredLength: UInt64.max) == .headerTooLarge)
        // Exactly the limit passes rule 2 and fails rule 3 (the file is far shorter).
        #expect(outcome(header: "{}", declaredLength: 100_000_000) == .invalidHeaderLength)
    }

    @Test("rule 3: N beyond the end of the file is an invalid header length")
    func beyondFile() {
        #expect(outcome(header: "{}", declaredLength: 3) == .invalidHeaderLength)
    }

    @Test("rule 4: a header that is not UTF-8 is refused")
    func notUTF8() throws {
        var bytes = safetensorsBytes(header: #"{"a\#u{e9}":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#)
        let i = bytes.firstIndex(of: 0xC3)!
        bytes[i] = 0xFF
        #expect(throws: SafetensorsError.self) { try openBytes(bytes) }
        do { _ = try openBytes(bytes) } catch let e as SafetensorsError { #expect(e.rule == .invalidHeaderUTF8) }
    }

    @Test("rule 5: strict JSON", arguments: [
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},}",  // trailing comma
        "\u{FEFF}{}",  // byte-order mark
        "{/*c*/}",  // comment
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[01],\"data_offsets\":[0,4]}}",  // leading zero
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1.0],\"data_offsets\":[0,4]}}",  // float where an integer is due
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}",  // negative
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,4]}}",  // > u64
        "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}",  // missing dtype
        "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}",  // missing shape
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}",  // missing data_offsets
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}",  // one offset
        "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",  // duplicate field
        "{\"__metadata__\":{},\"__metadata__\":{}}",  // duplicate __metadata__
        "{\"__metadata__\":{\"k\":1}}",  // metadata value not a string
        "{\"__metadata__\":[]}",  // metadata not an object
        "{\u{0B}}",  // vertical tab is not JSON whitespace
        "{}\u{0}\u{0}",  // NUL padding
        "[]",  // not an object
        "{\"a\":5}",  // entry not an object
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}",  // unterminated
    ])
    func strictJSON(header: String) {
        let rule = outcome(header: header, data: [0, 0, 0, 0])
        #expect(rule != nil, "accepted: \(header)")
        #expect(rule != .incompleteBuffer)
    }

    @Test("rule 5: dtype names are case-sensitive and must be known")
    func unknownDType() {
        #expect(outcome(header: #"{"a":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]) == .unknownDType)
        #expect(outcome(header: #"{"a":{"dtype":"F128","shape":[1],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]) == .unknownDType)
    }

    @Test("rule 5: padding, leading whitespace, null metadata and unknown entry fields are accepted")
    func accepted() throws {
        #expect(outcome(header: oneF32 + "    ", data: [0, 0, 0, 0]) == nil)
        #expect(outcome(header: " \n\t\r" + oneF32, data: [0, 0, 0, 0]) == nil)
        #expect(outcome(header: #"{"__metadata__":null,"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":[1,{"x":null}]}}"#, data: [0, 0, 0, 0]) == nil)
        let f = try openBytes(safetensorsBytes(header: #"{"__metadata__":null}"#))
        #expect(!f.header.hasMetadata)
        #expect(f.header.tensors.isEmpty)
    }

    @Test("duplicate tensor names are refused (the reference keeps the last)")
    func duplicateTensor() {
        let h = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        #expect(outcome(header: h, data: [UInt8](repeating: 0, count: 8)) == .duplicateTensor)
    }

    @Test("duplicate metadata keys are refused")
    func duplicateMetadata() {
        #expect(outcome(header: #"{"__metadata__":{"k":"1","k":"2"}}"#) == .duplicateMetadataKey)
    }

    @Test("a duplicate key is refused even when spelled with escapes")
    func duplicateEscaped() {
        let h = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\u0061":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
        #expect(outcome(header: h, data: [UInt8](repeating: 0, count: 8)) == .duplicateTensor)
    }

    @Test("a tensor named __metadata__ cannot exist: the key is metadata")
    func reservedName() {
        // As a tensor entry it is parsed as metadata and refused for its non-string values.
        let h = #"{"__metadata__":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
        #expect(outcome(header: h, data: [0, 0, 0, 0]) == .invalidJSON)
    }

    @Test("rule 6: offsets must be contiguous from 0 in (begin, end) order")
    func offsets() {
        // Gap at the start.
        #expect(outcome(header: #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#, data: [UInt8](repeating: 0, count: 8)) == .invalidOffset)
        // Overlap.
        let overlap = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}"#
        #expect(outcome(header: overlap, data: [UInt8](repeating: 0, count: 6)) == .invalidOffset)
        // End before begin.
        #expect(outcome(header: #"{"a":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}"#, data: [UInt8](repeating: 0, count: 4)) == .invalidOffset)
        // Out of order in the header but contiguous when sorted: accepted.
        let swapped = #"{"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
        #expect(outcome(header: swapped, data: [UInt8](repeating: 0, count: 8)) == nil)
    }

    @Test("rule 6: element counts overflow with checked arithmetic, never a trap")
    func overflow() {
        let h = #"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,4]}}"#
        #expect(outcome(header: h, data: [0, 0, 0, 0]) == .overflow)
        let h2 = #"{"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,4]}}"#
        #expect(outcome(header: h2, data: [0, 0, 0, 0]) == .overflow)
        let h3 = #"{"a":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]}}"#
        #expect(outcome(header: h3, data: [0, 0, 0, 0]) == .overflow)
        let h4 = #"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,18446744073709551615]}}"#
        #expect(outcome(header: h4, data: [0, 0, 0, 0]) == .overflow)
    }

    @Test("rule 6: sub-byte dtypes must fill whole bytes")
    func misaligned() {
        #expect(outcome(header: #"{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#, data: [0, 0]) == .misaligned)
        #expect(outcome(header: #"{"a":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#, data: [0, 0]) == nil)
        #expect(outcome(header: #"{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}"#, data: [0, 0, 0]) == nil)
    }

    @Test("rule 6: byte span must equal shape × dtype size")
    func tensorInfo() {
        #expect(outcome(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]) == .invalidTensorInfo)
    }

    @Test("rule 7: the data buffer must end exactly at the end of the file")
    func incomplete() {
        #expect(outcome(header: oneF32, data: [0, 0, 0]) == .incompleteBuffer)
        #expect(outcome(header: oneF32, data: [0, 0, 0, 0, 0]) == .incompleteBuffer)  // trailing bytes: polyglot fix
    }

    @Test("zero-sized tensors and scalars are valid")
    func zeroAndScalar() throws {
        let h = #"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"z":{"dtype":"BF16","shape":[3,0],"data_offsets":[4,4]}}"#
        let f = try openBytes(safetensorsBytes(header: h, data: floatBytes([2.5])))
        #expect(try f.floats("s") == [2.5])
        #expect(try f.floats("z") == [])
        #expect(f.info("s")?.shape == [])
    }

    @Test("every error names the file, the tensor where there is one, and the rule, on one line")
    func errorMessage() {
        let dir = TempDir()
        defer { dir.remove() }
        let p = dir.write("bad.safetensors", safetensorsBytes(header: #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]))
        do {
            _ = try SafetensorsFile(path: p)
            Issue.record("accepted")
        } catch {
            let text = String(describing: error)
            #expect(text.hasPrefix(p + ": tensor \"w\": invalid tensor info"))
            #expect(!text.contains("\n"))
        }
    }

    @Test("all dtypes of formats.md §1 are recognised with their bit sizes")
    func dtypes() {
        let expected: [String: Int] = [
            "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
            "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
            "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
        ]
        #expect(DType.allCases.count == expected.count)
        for (name, bits) in expected { #expect(DType(rawValue: name)?.bits == bits, "\(name)") }
    }
}

@Suite("safetensors reader: reading files written by the reference")
struct SafetensorsGoldenReadTests {
    @Test("tensor bytes, dtypes and shapes match what the reference wrote")
    func goldenMixed() throws {
        let f = try SafetensorsFile(path: fixture("safetensors/golden-mixed.safetensors"))
        let expected = try JSONParser.parse(readBytes(fixture("safetensors/golden-mixed.json")))
        let dtypeNames = ["float32": "F32", "float64": "F64", "bfloat16": "BF16", "float16": "F16", "int64": "I64", "uint64": "U64",
                          "int32": "I32", "uint32": "U32", "int16": "I16", "uint16": "U16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                          "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"]
        #expect(f.header.tensors.count == expected.objectValue!.members.count)
        for (name, e) in expected.objectValue!.members {
            let t = try #require(f.info(name))
            #expect(t.dtype.rawValue == dtypeNames[e["dtype"]!.stringValue!])
            #expect(t.shape == e["shape"]!.arrayValue!.map { $0.int! })
            let hex = try f.withBytes(of: name) { $0.map { String(format: "%02x", $0) }.joined() }
            #expect(hex == e["hex"]!.stringValue!)
        }
        #expect(f.header.metadataValue("format") == "pt")
    }

    @Test("F8 values read as the reference defines them")
    func f8() throws {
        let f = try SafetensorsFile(path: fixture("safetensors/golden-mixed.safetensors"))
        let e4 = try f.floats("e4m3")
        #expect(e4[0] == 1.0 && e4[1] == -1.0 && e4[2] == 448.0 && e4[3] == 0x1p-9)
        let e5 = try f.floats("e5m2")
        #expect(e5[0] == 1.0 && e5[1] == -1.0 && e5[2] == 57344.0 && e5[3] == .infinity)
    }
}
