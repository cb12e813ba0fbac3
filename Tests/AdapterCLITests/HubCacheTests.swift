import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

// Issue 12, item 16: snapshots/<rev>/ of the hub cache, whose files are links into ../../blobs/.
@Suite("Hugging Face cache snapshots")
struct HubCacheTests {
    @Test("a Hugging Face cache snapshot (links into ../../blobs) inspects and merges; OUT gets real files")
    func hubCacheSnapshot() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (_, snapshot) = try hubCache(dir)
        let inspect = try adapter("inspect", snapshot)
        #expect(inspect.status == 0, "\(inspect.stderr)")
        #expect(inspect.stdout.contains("2 shards"))
        let out = dir.file("out")
        let r = try adapter("merge", snapshot, mosloraAdapter, out)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(noteLines(r).isEmpty, "\(r.stderr)")
        #expect(folderEntries(out) == folderEntries(fixture("models/tiny-llama")))
        for name in folderEntries(out) { #expect(fileTypeNoFollow(out + "/" + name) == .typeRegular, "\(name) is not a regular file") }
        for name in ["config.json", "tokenizer.json", "model.safetensors.index.json"] {
            #expect(FileManager.default.contents(atPath: out + "/" + name) == FileManager.default.contents(atPath: fixture("models/tiny-llama/" + name)))
        }
        // The same merge from the plain folder writes the same bytes.
        let plain = dir.file("plain")
        #expect(try adapter("merge", "--quiet", fixture("models/tiny-llama"), mosloraAdapter, plain).status == 0)
        for name in folderEntries(plain) {
            #expect(FileManager.default.contents(atPath: out + "/" + name) == FileManager.default.contents(atPath: plain + "/" + name), "\(name)")
        }
    }

    @Test("in a cache snapshot, links that leave the cache's blobs/ (or point into a subfolder of it) are still refused",
          arguments: ["../../../outside.safetensors", "../../blobs/sub/shard", "../../refs/shard", "../abc999/shard"])
    func hubCacheEscape(_ target: String) throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (repo, snapshot) = try hubCache(dir)
        let shard = fixture("models/tiny-llama/model-00002-of-00002.safetensors")
        try FileManager.default.createDirectory(atPath: repo + "/blobs/sub", withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: repo + "/snapshots/abc999", withIntermediateDirectories: true)
        for p in [dir.file("hub/outside.safetensors"), repo + "/blobs/sub/shard", repo + "/refs/shard", repo + "/snapshots/abc999/shard"] {
            try FileManager.default.copyItem(atPath: shard, toPath: p)
        }
        try FileManager.default.removeItem(atPath: snapshot + "/model-00002-of-00002.safetensors")
        try makeSymlink(snapshot + "/model-00002-of-00002.safetensors", to: target)
        expectOneLineError(try adapter("inspect", snapshot), containing: "resolves outside the model folder")
        expectOneLineError(try adapter("merge", snapshot, mosloraAdapter, dir.file("out")), containing: "resolves outside the model folder")
    }

    @Test("a folder named snapshots/<rev> without a blobs/ beside snapshots/ gets no exception")
    func notAHubCache() throws {
        let dir = TempDir()
        defer { dir.remove() }
        let (repo, snapshot) = try hubCache(dir)
        try FileManager.default.moveItem(atPath: repo + "/blobs", toPath: repo + "/blobz")
        for name in folderEntries(snapshot) {
            try FileManager.default.removeItem(atPath: snapshot + "/" + name)
            try makeSymlink(snapshot + "/" + name, to: "../../blobz/" + String(format: "%040x", 0xb10b_0000 + folderEntries(fixture("models/tiny-llama")).firstIndex(of: name)!))
        }
        expectOneLineError(try adapter("inspect", snapshot), containing: "resolves outside the model folder")
    }
}
