import Foundation
import Testing

@Suite("adapter extract and adapter combine (the built binary)")
struct ExtractCombineCommandTests {
    let base = fixture("models/extract-base"), tuned = fixture("models/extract-tuned")

    @Test("extract prints one row per module (or JSON), notes what it leaves out, writes a PEFT folder")
    func extract() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let r = try adapter("extract", "--rank", "8", "--no-sync", base, tuned, dir.file("out"))
        #expect(r.status == 0, "\(r.stderr)")
        let rows = r.stdout.split(separator: "\n")
        #expect(rows.first == "module\trows\tcols\trank\tenergy_kept\trelative_error" && rows.count == 15)
        #expect(rows.dropFirst().allSatisfy { $0.split(separator: "\t")[3] == "8" })
        #expect(r.stderr.contains("the adapter leaves out 2 tensors that differ") && r.stderr.contains("extracted 14 modules"))
        #expect(FileManager.default.fileExists(atPath: dir.file("out/adapter_config.json")))
        let j = try adapter("extract", "--keep-energy", "0.999", "--json", "--quiet", "--no-sync", base, tuned, dir.file("json"))
        #expect(j.status == 0 && j.stderr.isEmpty)
        let report = try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any]
        let modules = report?["modules"] as? [[String: Any]]
        #expect(modules?.count == 14 && modules?.allSatisfy { ($0["rank"] as? Int) == 8 } == true)
        #expect((report?["left_out"] as? [Any])?.count == 2)
        // --dtype: the factors' dtype (default: the base weights', F32 here).
        #expect(try adapter("extract", "--rank", "4", "--dtype", "bf16", "--quiet", "--no-sync", base, tuned, dir.file("bf16")).status == 0)
        let header = try adapter("inspect", dir.file("bf16"))
        #expect(header.stdout.contains("BF16") && !header.stdout.contains("F32"), "\(header.stdout)")
    }

    @Test("extract: usage errors exit 2, refused inputs exit 1 with one line, and nothing is written")
    func extractErrors() throws {
        let dir = TempDir()
        defer { dir.remove() }
        #expect(try adapter("extract", base, tuned, dir.file("a")).status == 2, "neither --rank nor --keep-energy")
        #expect(try adapter("extract", "--rank", "4", "--keep-energy", "0.9", base, tuned, dir.file("a")).status == 2)
        #expect(try adapter("extract", "--keep-energy", "1.5", base, tuned, dir.file("a")).status == 2)
        expectOneLineError(try adapter("extract", "--rank", "4", base, base, dir.file("a")), containing: "TUNED is the same as BASE")
        expectOneLineError(try adapter("extract", "--rank", "4", base, fixture("models/tiny-llama"), dir.file("a")), containing: "in BASE but [32, 16] in TUNED")
        expectOneLineError(try adapter("extract", "--rank", "4", "--include", "(", base, tuned, dir.file("a")), containing: "--include: not a regular expression")
        #expect(!FileManager.default.fileExists(atPath: dir.file("a")))
    }

    @Test("combine cat and svd: one row per module; usage errors exit 2, refusals 1 with one line")
    func combine() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let a = fixture("adapters/peft-lora"), b = fixture("adapters/moslora-original")
        let r = try adapter("combine", a, b + ":-0.5", "-o", dir.file("cat"), "--no-sync")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.hasPrefix("module\tinputs\trank\tenergy_kept\n") && r.stderr.contains("combined 2 adapters into 10 modules (cat)"))
        let s = try adapter("combine", a, b, "--method", "svd", "--rank", "2", "-o", dir.file("svd"), "--no-sync", "--quiet")
        #expect(s.status == 0 && s.stdout.split(separator: "\n").dropFirst().allSatisfy { $0.split(separator: "\t")[2] == "2" })
        #expect(try adapter("combine", a, "-o", dir.file("x")).status == 2, "one adapter")
        #expect(try adapter("combine", a, b, "--method", "ties", "-o", dir.file("x")).status == 2, "ties without --rank")
        #expect(try adapter("combine", a, b + ":abc", "-o", dir.file("x")).status == 2, "a weight that is not a number")
        expectOneLineError(try adapter("combine", a, fixture("adapters/real-dora"), "-o", dir.file("x")), containing: "is DoRA")
        expectOneLineError(try adapter("combine", a, b, "-o", dir.file("cat")), containing: "already exists")
        #expect(!FileManager.default.fileExists(atPath: dir.file("x")))
    }
}
