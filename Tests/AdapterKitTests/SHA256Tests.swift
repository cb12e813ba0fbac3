import Testing
@testable import AdapterKit

@Suite("SHA-256")
struct SHA256Tests {
    /// FIPS 180-4 / NIST CSRC example values.
    @Test("the published test vectors, with both block functions")
    func vectors() {
        let cases: [(String, String)] = [
            ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
            ("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
             "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"),
        ]
        for accelerated in [false, true] {
            for (text, digest) in cases {
                var h = SHA256(accelerated: accelerated)
                h.update(text)
                #expect(h.finish() == digest, "\(text.prefix(10)) accelerated: \(accelerated)")
            }
            var h = SHA256(accelerated: accelerated)
            let block = [UInt8](repeating: UInt8(ascii: "a"), count: 1000)
            for _ in 0..<1000 { h.update(block) }
            #expect(h.finish() == "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
        }
    }

    @Test("every length and split point gives the same digest in one piece, in pieces, and portably")
    func streaming() {
        var rng = SeededGenerator(seed: 7)
        let data = (0..<700).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        for n in [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129, 300, 700] {
            let bytes = Array(data[0..<n])
            var whole = SHA256(accelerated: false)
            whole.update(bytes)
            let expected = whole.finish()
            var fast = SHA256()
            fast.update(bytes)
            #expect(fast.finish() == expected, "length \(n)")
            for cut in Set([0, 1, n / 3, n / 2, max(0, n - 1), n]) where cut <= n {
                var pieces = SHA256()
                pieces.update(Array(bytes[0..<cut]))
                pieces.update(Array(bytes[cut..<n]))
                #expect(pieces.finish() == expected, "length \(n) cut at \(cut)")
            }
        }
    }
}
