import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Issue 12, item 4: what a merge or `convert to-safetensors` copies of a folder besides its
// tensors: no symbolic links leaving the folder, no loops, no version-control folders.
@Suite("model folders: only regular files and plain subfolders are copied")
struct ModelFolderCopyTests {
    @Test("a link leaving the model folder is not copied (its target never reaches OUT); a note says so")
    func linkLeavingFolder() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try Data("TOP-SECRET-KEY".utf8).write(to: URL(fileURLWithPath: dir.file("secret")))
        try makeSymlink(model + "/tokenizer.model", to: "../secret")
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!folderEntries(out).contains("tokenizer.model"))
        #expect(allRegularBytes(out).range(of: Data("TOP-SECRET-KEY".utf8)) == nil)
        #expect(noteLines(r).count == 1 && noteLines(r)[0].contains("tokenizer.model") && noteLines(r)[0].contains("leaves the model folder"), "\(r.stderr)")
    }

    @Test("a link to a folder (zzz → .) is not followed: no recursion; a note says so")
    func linkLoop() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try makeSymlink(model + "/zzz", to: ".")
        try makeSymlink(model + "/up", to: "..")
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!folderEntries(out).contains("zzz") && !folderEntries(out).contains("up"))
        #expect(noteLines(r).count == 1 && noteLines(r)[0].contains("zzz") && noteLines(r)[0].contains("up"), "\(r.stderr)")
    }

    @Test("version-control folders (.git, .hg, .svn) are skipped; plain subfolders are copied; a note lists what was skipped")
    func vcsFolders() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        for vcs in [".git", ".hg", ".svn"] {
            _ = try FileManager.default.createDirectory(atPath: model + "/" + vcs + "/objects", withIntermediateDirectories: true)
            try Data("ref".utf8).write(to: URL(fileURLWithPath: model + "/" + vcs + "/objects/HEAD"))
        }
        try FileManager.default.createDirectory(atPath: model + "/extra/deeper", withIntermediateDirectories: true)
        try Data("notes".utf8).write(to: URL(fileURLWithPath: model + "/extra/deeper/readme.txt"))
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(!folderEntries(out).contains(".git") && !folderEntries(out).contains(".hg") && !folderEntries(out).contains(".svn"))
        #expect(FileManager.default.contents(atPath: out + "/extra/deeper/readme.txt") == Data("notes".utf8))
        #expect(noteLines(r).count == 1, "\(r.stderr)")
        #expect([".git", ".hg", ".svn"].allSatisfy { noteLines(r).first?.contains($0) ?? false }, "\(r.stderr)")
    }

    @Test("a link to a file inside the model folder is copied as that file's content (a regular file in OUT)")
    func innerLinkCopiedAsContent() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let model = try tinyModelCopy(dir)
        try makeSymlink(model + "/tokenizer.alias.json", to: "tokenizer.json")
        let out = dir.file("out")
        let r = try adapter("merge", model, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(fileTypeNoFollow(out + "/tokenizer.alias.json") == .typeRegular)
        #expect(FileManager.default.contents(atPath: out + "/tokenizer.alias.json") == FileManager.default.contents(atPath: model + "/tokenizer.json"))
        #expect(noteLines(r).isEmpty, "\(r.stderr)")
    }

    @Test("convert to-safetensors of a folder follows the same rules: no links out, no loops, no .git")
    func toSafetensorsFolder() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let folder = dir.file("bin-adapter")
        try FileManager.default.createDirectory(atPath: folder + "/.git", withIntermediateDirectories: true)
        try Data("ref".utf8).write(to: URL(fileURLWithPath: folder + "/.git/HEAD"))
        try FileManager.default.copyItem(atPath: fixture("pytorch/adapter_model.bin"), toPath: folder + "/adapter_model.bin")
        try FileManager.default.copyItem(atPath: fixture("adapters/peft-lora/adapter_config.json"), toPath: folder + "/adapter_config.json")
        try Data("TOP-SECRET-KEY".utf8).write(to: URL(fileURLWithPath: dir.file("secret")))
        try makeSymlink(folder + "/README.md", to: dir.file("secret"))
        try makeSymlink(folder + "/zzz", to: ".")
        let out = dir.file("out")
        let (r, timedOut) = try adapterWithDeadline(20, "convert", "to-safetensors", folder, out)
        #expect(!timedOut)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(folderEntries(out) == ["adapter_config.json", "adapter_model.safetensors"])
        #expect(noteLines(r).count == 1 && ["README.md", "zzz", ".git"].allSatisfy { noteLines(r)[0].contains($0) }, "\(r.stderr)")
    }
}
